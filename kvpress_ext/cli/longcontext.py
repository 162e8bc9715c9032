"""The command lines of ``evaluation/needle.py``, ``ruler.py`` and ``longbench.py``: one parser each over the
long-context runner (:mod:`kvpress_ext.evaluation.runners.longcontext`), the tasks that build their samples
(:mod:`kvpress_ext.evaluation.tasks`) and the report (:mod:`kvpress_ext.evaluation.reports.longcontext`)."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from kvpress_ext.cli.common import (
    OneLineArgumentParser,
    add_model_argument,
    add_sweep_args,
    add_threads_argument,
    command_entry,
    sweep_options_from_args,
)
from kvpress_ext.core.errors import KVPressExtError
from kvpress_ext.core.registry import press_info
from kvpress_ext.evaluation import longcontext as lc
from kvpress_ext.evaluation.metrics import LONGBENCH_METRICS
from kvpress_ext.evaluation.model_cache import get_model
from kvpress_ext.evaluation.reports.longcontext import records_from_folders, write_outputs
from kvpress_ext.evaluation.runners import longcontext as runner
from kvpress_ext.evaluation.sweep import check_options
from kvpress_ext.evaluation.tasks import needle as needle_task
from kvpress_ext.evaluation.tasks.prompts import cell_prompt, check_lengths, context_limit
from kvpress_ext.evaluation.tasks.records import keep_records
from kvpress_ext.presses.a3.press import STRATEGIES
from kvpress_ext.runtime.models import resolve_model
from kvpress_ext.runtime.threads import set_threads
from kvpress_ext.storage.inputs import path_digest, shared_dir
from kvpress_ext.storage.safe_write import check_output_dir

NEEDLE_DOC = """Needle in a haystack for every press (and A3 fusion): a pass key (5-7 random digits from --seed), or RULER's
multi-key / multi-value needles, at several depths of haystacks of several lengths; accuracy per depth x length,
question-agnostic or --query_aware; the fraction of the needle each press kept, per layer.

    python evaluation/needle.py --model smollm2-135m --lengths 1024 2048 --depths 0 0.5 1 \\
        --num_keys 2 --press snapkv streaming_llm rkv --compression_ratio 0.25 0.5 --both_modes
    python evaluation/needle.py --strategies debug blend random --rate 0.15 --lengths 2048
    python evaluation/needle.py --task multidoc --chunk_tokens 500 --lengths 2000 4000 \\
        --strategies debug blend --rate 0.15

--task multidoc: multi-document QA, --lengths // --chunk_tokens documents (the starts of distinct files of
--haystack_dir, each cut to --chunk_tokens tokens, "Document [i] (Title: ...)"), the pass key in document
depth x (N - 1), rounded half up; A3 caches one chunk per document.

Writes one JSON per cell (<output_dir>/cells/), summary.json, summary.md and heatmap_<mode>.png, and prints where;
a second run reuses finished cells (marked with the date they were measured in summary.md). One report over the
grids of several models (a column per model; each press judged against its own model's no press):

    python evaluation/needle.py --summary_from results/needle/smollm2-135m results/needle/gemma3-270m \
        --output_dir results/needle/both_models
"""

RULER_DOC = """RULER-style retrieval for every press (and A3 fusion): built-in niah_single / multikey / multivalue needles
in a haystack (see evaluation/needle.py for the options), or --data_file JSONL with context/question/outputs
(optional answer_prefix). Score: RULER's string match (fraction of the expected outputs in the answer).

    python evaluation/ruler.py --task multikey --lengths 1024 --press snapkv --compression_ratio 0.5
    python evaluation/ruler.py --data_file ruler.jsonl --press knorm --query_aware
"""

LONGBENCH_DOC = """LongBench for every press (and A3 fusion), scored with each task's LongBench metric; question-agnostic or
--query_aware. Data: THUDM/LongBench from the hub, or --data_file JSON/JSONL with context/input/answers
(optional all_classes).

    python evaluation/longbench.py --task hotpotqa --model <hub id or path> --press snapkv knorm \\
        --compression_ratio 0.25 0.5 --strategies blend debug --max_samples 50
    python evaluation/longbench.py --task hotpotqa --data_file my.jsonl
"""

#: new tokens of a --quick needle answer: a 7-digit pass key is 7 tokens on models that write digits one by one
QUICK_NEW_TOKENS = 10


def cli_main(fn: Callable[[], object]) -> int:
    """Run ``fn``; bad input (any :class:`~kvpress_ext.core.errors.KVPressExtError`) is one line and exit 2."""
    try:
        fn()
    except KVPressExtError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


def add_grid_arguments(ap, name: str) -> None:
    """Options shared by needle.py, ruler.py and longbench.py."""
    add_model_argument(ap)  # --model (short name, directory, hub id) and --no_chat_template
    ap.add_argument("--press", nargs="+", default=["no_press"],
                    help="registered presses (or all); no_press is always added as the baseline")
    ap.add_argument("--compression_ratio", type=float, nargs="+", default=[0.5],
                    help="ratios in [0, 1) for every press (budget presses keep 1 - ratio of the context)")
    ap.add_argument("--query_aware", action="store_true",
                    help="the question is part of the compressed context (kvpress's evaluation); default: "
                         "the context is compressed before the question is seen")
    ap.add_argument("--both_modes", action="store_true", help="run question-agnostic and question-aware")
    ap.add_argument("--strategies", nargs="*", default=[], help="A3 fusion strategies (adds the prefill baseline)")
    ap.add_argument("--rate", type=float, nargs="+", default=[0.15], help="A3: fractions of tokens recomputed")
    ap.add_argument("--evict", default=None, help="A3: press evicting from the fused cache (at each ratio)")
    ap.add_argument("--max_new_tokens", type=int, default=None, help="most answer tokens (default: by task)")
    ap.add_argument("--chunk_tokens", type=int, default=None,
                    help="A3 chunk size (default 128; needle.py --task multidoc: 512, the size of each document)")
    ap.add_argument("--max_context_tokens", type=int, default=None, help="cut the middle of longer contexts")
    ap.add_argument("--prefill_chunk_size", type=int, nargs="+", default=[], metavar="N",
                    help="also run every press and ratio with the context prefilled in chunks of N tokens, "
                         "compressed after each chunk (one mode per N, beside the one-shot cells, which always run); "
                         "question-agnostic only, not for no_press or A3")
    ap.add_argument("--attn_implementation", default=None, help="eager / sdpa (default: the model's)")
    ap.add_argument("--no_diagnostic", action="store_true", help="skip the needle-kept diagnostic")
    ap.add_argument("--retry_failed", action="store_true",
                    help="rerun the cells recorded as failed (default: they are kept; finished cells are skipped)")
    ap.add_argument("--summary_only", action="store_true", help="rebuild the summaries from the cells on disk")
    ap.add_argument("--summary_from", nargs="+", default=None, metavar="DIR",
                    help="write one summary of the cells of these output folders (e.g. one grid per model: a "
                         "column per model in every table) into --output_dir; runs nothing")
    ap.add_argument("--quick", action="store_true", help="a tiny grid for tests (under a minute)")
    ap.add_argument("--output_dir", default=None, help=f"default results/{name}/<model name> (one folder per model)")
    add_threads_argument(ap)
    ap.add_argument("--no_progress", action="store_true", help="hide the progress bar and per-cell lines")
    add_sweep_args(ap)


def methods_from_args(args) -> list[str]:
    bad = [s for s in args.strategies if s not in STRATEGIES]
    if bad:
        raise lc.InputError(f"unknown strategy {', '.join(bad)}; choose from {', '.join(STRATEGIES)}")
    if args.evict is not None:
        try:
            press_info(args.evict)
        except Exception as e:  # noqa: BLE001
            raise lc.InputError(str(e).splitlines()[0]) from None
    methods = runner.expand_presses(args.press)
    if args.strategies:
        methods += [runner.PREFILL] + [f"{runner.A3_PREFIX}{s}" for s in args.strategies]
        if args.evict:
            methods += [f"{runner.A3_PREFIX}{s}+{args.evict}" for s in args.strategies]
    return methods


def check_args(args) -> tuple[list[str], list[bool]]:
    """Methods and modes, or an :class:`~kvpress_ext.evaluation.longcontext.InputError` naming the fix."""
    for r in args.compression_ratio:
        if not 0 <= r < 1:
            raise lc.InputError(f"--compression_ratio {r} is out of range: use ratios in [0, 1)")
    for r in args.rate:
        if not 0 <= r <= 1:
            raise lc.InputError(f"--rate {r} is out of range: use rates in [0, 1]")
    for flag in ("max_new_tokens", "chunk_tokens", "max_context_tokens", "max_samples"):
        if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
            raise lc.InputError(f"--{flag} must be a positive integer")
    methods = methods_from_args(args)
    if args.output_dir is not None:  # a directory we may not write into: one line before any model work
        check_output_dir(args.output_dir)
    check_options(sweep_options_from_args(args))
    modes = [False, True] if args.both_modes else [bool(args.query_aware)]
    check_chunk_args(args, methods, modes)
    if not any(runner.mode_error(m, qa) is None for m in methods for qa in modes if m != "no_press" or len(methods) == 1):
        raise lc.InputError(runner.mode_error(methods[-1], modes[-1]))
    return methods, modes



def check_chunk_args(args, methods: list[str], modes: list[bool]) -> None:
    """``--prefill_chunk_size``: positive sizes, a question-agnostic mode and a press to feed in chunks."""
    chunks = args.prefill_chunk_size
    if not chunks:
        return
    if any(c < 1 for c in chunks):
        raise lc.InputError("--prefill_chunk_size takes chunk sizes of at least 1 token (one-shot prefill always "
                            "runs beside them): drop 0 and negative sizes")
    if False not in modes:
        raise lc.InputError(lc.CHUNKS_AGNOSTIC_ONLY)
    if not any(runner.mode_error(m, False, chunks[0]) is None for m in methods):
        raise lc.InputError("--prefill_chunk_size feeds the presses in chunks, and no_press and A3 are never "
                            "chunked: add a press (--press snapkv ...)")
    args.prefill_chunk_size = sorted(set(chunks))


def check_chunk_lengths(tokenizer, samples: list[dict], settings: dict, chunks: list[int]) -> None:
    """A chunk size larger than the shortest context (chat template and needle included) would prefill some
    contexts in one pass: one line naming the largest size that fits."""
    if not chunks:
        return
    length = min(s["length"] for s in samples)
    shortest = min(len(cell_prompt(tokenizer, {**settings, **s, "query_aware": False})[2])
                   for s in samples if s["length"] == length)
    if max(chunks) > shortest:
        raise lc.InputError(f"--prefill_chunk_size {max(chunks)} is larger than the shortest context "
                            f"({shortest} tokens): use chunk sizes up to {shortest} (or longer --lengths)")


def settings_from_args(args, max_new_tokens: int) -> dict:
    """Everything of the command line that changes a cell's numbers, the model's files included (part of every
    cell's key: another checkpoint under the same name is computed anew)."""
    return {"model": args.model, "model_files": path_digest(resolve_model(args.model)), "max_new_tokens": max_new_tokens, "chunk_tokens": args.chunk_tokens or 128,
            "max_context_tokens": args.max_context_tokens, "attn_implementation": args.attn_implementation,
            "chat_template": args.use_chat_template, "diagnostic": not args.no_diagnostic}



def run_grid(args, name: str, samples: list[dict], methods: list[str], modes: list[bool], max_new_tokens: int):
    """The runner's grid for the parsed options; prints where it wrote. Returns (records, outputs)."""
    set_threads(args.threads)
    out_dir = Path(args.output_dir or Path("results") / name / (Path(str(args.model)).name or "model"))
    records, outputs = runner.run_grid(
        name, samples, methods, modes, settings_from_args(args, max_new_tokens), args.compression_ratio, args.rate,
        out_dir, sweep_options_from_args(args), retry_failed=args.retry_failed, compute=not args.summary_only,
        command=" ".join(shlex.quote(a) for a in sys.argv), chunks=args.prefill_chunk_size)
    if args.prefill_chunk_size:
        print(f"note: chunked prefill ({', '.join(map(str, args.prefill_chunk_size))} tokens) ran the presses "
              "question-agnostic only; no_press and A3 always prefill in one pass (summary.md: Chunked prefill)")
    if any(r.get("chat_template") is False for r in records):  # a base model (gemma3-270m): say how it was prompted
        print(f"note: {args.model} was prompted completion-style (no chat template: BOS, context, blank line, "
              "question, answer prefix); the cells record chat_template: false")
    return records, outputs


def summary_from(args, name: str) -> int:
    """``--summary_from``: the report of the cells of several output folders (no model loaded, nothing run)."""
    def go():
        if not args.output_dir:
            raise lc.InputError("--summary_from writes a new summary: pass --output_dir (a folder of its own)")
        out = Path(args.output_dir).resolve()
        if any(Path(d).resolve() == out for d in args.summary_from):
            raise lc.InputError(f"--output_dir {args.output_dir} is one of the --summary_from folders: pass a "
                                "folder of its own (its summary would replace that grid's)")
        check_output_dir(out)
        records = records_from_folders(args.summary_from)
        models = sorted({str(r.get("model")) for r in records})
        outputs = write_outputs(records, out, f"{name}: {', '.join(models)}",
                                " ".join(shlex.quote(a) for a in sys.argv), reused={r["key"] for r in records})
        print(outputs["markdown"])
        print(f"wrote {', '.join(outputs['files'])}")

    return cli_main(go)


def _print_outputs(outputs: dict) -> None:
    print(outputs["markdown"])
    print(f"wrote {', '.join(outputs['files'])} and one JSON per cell in {outputs['cells_dir']}")


def add_needle_arguments(ap, default_task: str, tasks) -> None:
    ap.add_argument("--task", default=default_task, choices=tasks, help="needle kind (default: %(default)s)")
    ap.add_argument("--haystack_file", default=None, help="a text file (default: --haystack_dir)")
    ap.add_argument("--haystack_dir", default=str(shared_dir() / "data" / "paul_graham_essays"),
                    help="a folder of *.txt files")
    ap.add_argument("--lengths", type=int, nargs="+", default=None, help="haystack tokens (default 256 512 1024)")
    ap.add_argument("--depths", type=float, nargs="+", default=None, help="needle depths in [0, 1]")
    ap.add_argument("--num_keys", type=int, default=None, help="samples (keys) per length x depth (default 3)")
    ap.add_argument("--n_needles", type=int, default=4, help="needles of multikey / multivalue")
    ap.add_argument("--seed", type=int, default=0, help="seed of the keys and values")


def needle_grid(args, name: str) -> int:
    def go():
        multidoc = args.task == needle_task.MULTIDOC
        if args.chunk_tokens is None:  # multidoc: each document is one A3 chunk
            args.chunk_tokens = (128 if args.quick else 512) if multidoc else 128
        if args.quick:
            args.lengths = args.lengths or [2 * args.chunk_tokens if multidoc else 128]
            args.depths = args.depths or [0.0, 1.0]
            args.num_keys = args.num_keys or 1
        lengths = args.lengths or ([2 * args.chunk_tokens, 4 * args.chunk_tokens] if multidoc else [256, 512, 1024])
        depths = args.depths if args.depths is not None else [0.0, 0.25, 0.5, 0.75, 1.0]
        num_keys = args.num_keys or 3
        max_new = args.max_new_tokens or (QUICK_NEW_TOKENS if args.quick else
                                          12 * (args.n_needles if args.task == "multivalue" else 1))
        methods, modes = check_args(args)
        if any(not 0 <= d <= 1 for d in depths):
            raise lc.InputError("--depths must lie in [0, 1]")
        if any(n < 16 for n in lengths):
            raise lc.InputError("--lengths must be at least 16 tokens")
        if num_keys < 1 or args.n_needles < 1:
            raise lc.InputError("--num_keys and --n_needles must be positive")
        haystack = args.haystack_file or args.haystack_dir
        if multidoc:
            if args.haystack_file:
                raise lc.InputError("--task multidoc takes a folder of documents: pass --haystack_dir, not "
                                    "--haystack_file")
            lc.check_documents(haystack, lengths, args.chunk_tokens)  # too few files: one line, exit 2
        else:
            needle_task.haystack_sentences(haystack)  # missing or empty: one line, exit 2
        model, tok = get_model(args.model, attn_implementation=args.attn_implementation)
        samples = [{"source": "needle", "task": args.task, "haystack": haystack, "length": n, "depth": d,
                    "key_index": k, "seed": args.seed, "n_needles": args.n_needles}
                   for n in lengths for d in depths for k in range(num_keys)]
        check_lengths(model, tok, samples, settings_from_args(args, max_new), modes)
        check_chunk_lengths(tok, samples, settings_from_args(args, max_new), args.prefill_chunk_size)
        _, outputs = run_grid(args, name, samples, methods, modes, max_new)
        _print_outputs(outputs)

    return cli_main(go)


def _parser(name: str, doc: str) -> OneLineArgumentParser:
    """The parser of ``evaluation/<name>.py``: its docstring kept as written (the examples' line breaks)."""
    return OneLineArgumentParser(prog=f"{name}.py", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


@command_entry("needle")
def needle_main(argv=None) -> int:
    ap = _parser("needle", NEEDLE_DOC)
    add_needle_arguments(ap, "passkey", (*needle_task.NEEDLE_TASKS, needle_task.MULTIDOC))
    add_grid_arguments(ap, "needle")
    args = ap.parse_args(argv)
    return summary_from(args, "needle") if args.summary_from else needle_grid(args, "needle")


@command_entry("ruler")
def ruler_main(argv=None) -> int:
    ap = _parser("ruler", RULER_DOC)
    ap.add_argument("--data_file", default=None, help="JSONL with context/question/outputs[/answer_prefix]")
    ap.add_argument("--max_samples", type=int, default=None, help="with --data_file: the first N records")
    add_needle_arguments(ap, "niah_single", [t for t in needle_task.NEEDLE_TASKS if t != "passkey"])
    add_grid_arguments(ap, "ruler")
    args = ap.parse_args(argv)
    if args.summary_from:
        return summary_from(args, "ruler")
    if not args.data_file:
        return needle_grid(args, "ruler")

    def go():
        methods, modes = check_args(args)
        records = lc.read_records(args.data_file)
        lc.require_fields(records, ("context", "question", "outputs"), args.data_file)
        n = min(len(records), args.max_samples or len(records), 2 if args.quick else len(records))
        max_new = args.max_new_tokens or (4 if args.quick else 16)
        get_model(args.model, attn_implementation=args.attn_implementation)
        samples = [{"source": "file", "format": "ruler", "data_file": str(args.data_file), "index": i,
                    "length": records[i].get("length"), "depth": records[i].get("depth")} for i in range(n)]
        _, outputs = run_grid(args, "ruler", samples, methods, modes, max_new)
        _print_outputs(outputs)

    return cli_main(go)


@command_entry("longbench")
def longbench_main(argv=None) -> int:
    ap = _parser("longbench", LONGBENCH_DOC)
    ap.add_argument("--task", default="hotpotqa", help="LongBench subset, e.g. hotpotqa, qasper, trec")
    ap.add_argument("--data_file", default=None, help="local JSON/JSONL with context/input/answers[/all_classes]")
    ap.add_argument("--max_samples", type=int, default=None, help="evaluate only the first N records")
    add_grid_arguments(ap, "longbench")
    args = ap.parse_args(argv)
    if args.summary_from:
        return summary_from(args, "longbench")

    def go():
        if args.task not in LONGBENCH_METRICS and args.task.removesuffix("_e") not in LONGBENCH_METRICS:
            raise lc.InputError(f"unknown LongBench task {args.task!r}; choose one of: "
                                f"{', '.join(sorted(LONGBENCH_METRICS))}")
        methods, modes = check_args(args)
        params = {"source": "file", "format": "longbench", "data_file": args.data_file, "task": args.task}
        if args.data_file:
            records = lc.read_records(args.data_file)
            lc.require_fields(records, ("context", "input", "answers"), args.data_file)
        else:
            try:
                import datasets  # optional heavy dependency, only for the hub's LongBench

                records = list(datasets.load_dataset("THUDM/LongBench", args.task, split="test"))
            except Exception as e:  # noqa: BLE001 - offline, unknown config, script datasets unsupported...
                raise lc.InputError(f"cannot load THUDM/LongBench {args.task!r} ({type(e).__name__}); "
                                    "pass --data_file") from None
            keep_records("longbench", None, args.task, records)
        n = min(len(records), args.max_samples or len(records), 2 if args.quick else len(records))
        max_new = args.max_new_tokens or (4 if args.quick else 32)
        model, _ = get_model(args.model, attn_implementation=args.attn_implementation)
        if args.max_context_tokens is None and context_limit(model):
            args.max_context_tokens = context_limit(model) - max_new - 128
        samples = [{**params, "index": i} for i in range(n)]
        _, outputs = run_grid(args, "longbench", samples, methods, modes, max_new)
        _print_outputs(outputs)

    return cli_main(go)
