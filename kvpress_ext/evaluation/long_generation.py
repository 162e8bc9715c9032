"""R-KV and other decode-time presses on long generation.

Two measures, each against the full (uncompressed) cache, for every method at every token budget:

* :func:`nll_cell` (part i): teacher-forced NLL of a long continuation. A ``context`` of text is prefilled
  through the press, then the continuation is fed token by token (or ``decode_chunk_size`` tokens per
  forward) with the press active, so each token is scored from the cache the press compressed while
  "decoding" (the incremental scorer of :func:`kvpress_ext.evaluation.perplexity.compressed_nll`).
* :func:`generation_cell` (part ii): greedy generation with :func:`kvpress_ext.runtime.generate.generate_ids` (the
  pipeline's own generation loop, so the press is applied exactly as there), the cache length after every
  generated token, and :func:`agreement` of the tokens with the full cache's generation.

Methods: ``full`` (no press), ``rkv`` (budget = ``budget``), ``lazy_streaming`` (``cap_total`` = budget) and
kvpress's ``DecodingPress`` (``target_size`` = budget) around ``snapkv`` and ``streaming_llm``, each in a
:class:`~kvpress_ext.core.temporal_order.TemporalOrderPress` (DecodingPress compresses the same cache again, and
kvpress leaves kept entries in score order). ``rkv`` and the
decoding presses let the cache grow by up to ``compression_interval`` tokens between compressions (snapkv's
observation window is ``min(64, compression_interval // 2)`` queries); ``lazy_streaming`` never exceeds its cap (slack
``min(64, budget // 4)``). Each (method, budget) is one cell whose JSON is written as soon as it
is done, so a long grid can be run in parts into one folder (finished cells are skipped).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import torch

from kvpress_ext.core.adapters import get_adapter
from kvpress_ext.core.errors import KVPressExtError
from kvpress_ext.core.positions import cache_length
from kvpress_ext.evaluation.perplexity import compressed_nll

METHODS = ("full", "rkv", "lazy_streaming", "decoding_snapkv", "decoding_streaming_llm")
#: A prompt that asks for a long answer, so 1,000 generated tokens are mostly one text.
DEFAULT_GEN_PROMPT = ("Write a long, detailed story (at least 2,000 words) about a young woman who leaves her village "
                      "to become a lighthouse keeper on a remote island. Describe the island, the people she meets, "
                      "the storms, and how she changes over the years, chapter by chapter.")


class LongGenerationInputError(KVPressExtError):
    """Bad input to the long-generation evaluation (a budget <= 0, an unknown method, a text too short)."""


@dataclass(frozen=True)
class Cell:
    method: str
    budget: int | None  # None for ``full``

    @property
    def name(self) -> str:
        return self.method if self.budget is None else f"{self.method}_b{self.budget}"


def check_budgets(budgets) -> list[int]:
    budgets = list(budgets)
    if not budgets or any(isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in budgets):
        raise LongGenerationInputError(f"--budgets {budgets} must be positive integers (tokens kept in the cache).")
    return budgets


def cells(methods, budgets, first_budget: int | None = None) -> list[Cell]:
    """``full`` once (first: every other cell is compared with it), then every other method at every budget,
    ``first_budget``'s cells first (a run stopped by a time limit has the most wanted cells)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise LongGenerationInputError(f"Unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}.")
    budgets = sorted(check_budgets(budgets), key=lambda b: b != first_budget)
    out = [Cell("full", None)] if "full" in methods else []
    return out + [Cell(m, b) for b in budgets for m in methods if m != "full"]


def build_press(method: str, budget: int | None, compression_interval: int = 128, n_sink: int = 4, slack: int = 64):
    """The press of ``method`` holding ``budget`` tokens (None for ``full``)."""
    from kvpress_ext.core.registry import get_press

    if method == "full":
        return None
    check_budgets([budget])
    if method == "rkv":
        return get_press("rkv", budget=budget, compression_interval=compression_interval)
    if method == "lazy_streaming":
        # small caps (tests) keep most of the cap as the recent window
        return get_press("lazy_streaming", cap_total=budget, n_sink=n_sink, slack=min(slack, budget // 4))
    if method in ("decoding_snapkv", "decoding_streaming_llm"):
        from kvpress_ext.core.registry import NoCompressionWarning, press_info
        from kvpress_ext.core.temporal_order import in_temporal_order

        # snapkv scores with the queries buffered since the last compression
        extra = {"window_size": min(64, compression_interval // 2)} if method == "decoding_snapkv" else {}
        with warnings.catch_warnings():  # ratio 0: DecodingPress sets the ratio of each compression itself
            warnings.simplefilter("ignore", NoCompressionWarning)
            base = get_press(method.removeprefix("decoding_"), compression_ratio=0.0, **extra)
        # DecodingPress compresses the same cache every interval: the kept entries must stay in token order
        return press_info("decoding").cls(base_press=in_temporal_order(base), target_size=budget,
                                          compression_interval=compression_interval)
    raise LongGenerationInputError(f"Unknown method {method!r}; choose from {', '.join(METHODS)}.")


# --- part (i): teacher-forced NLL --------------------------------------------------------------------------------


def nll_cell(model, input_ids: torch.Tensor, context: int, press, decode_chunk_size: int = 1,
             segment: int = 256) -> dict:
    """NLL of the tokens after the first ``context`` ones of ``input_ids`` (1 x n), under ``press``.

    The context is prefilled in one forward (through the press), the continuation is fed ``decode_chunk_size``
    tokens per forward (one chunk of ``context`` tokens at a time without a press: the same numbers, faster)."""
    n = input_ids.shape[1]
    if not 1 <= context < n - 1:
        raise LongGenerationInputError(f"--context {context} must be at least 1 and leave at least 2 tokens to score "
                                       f"(the text has {n} tokens).")
    start = time.perf_counter()
    nll, stats = compressed_nll(model, input_ids, press, context_limit=n, chunk_size=context,
                                decode_chunk_size=decode_chunk_size)
    seconds = time.perf_counter() - start
    cont = nll[context - 1:]  # nll[j] scores token j + 1: the continuation starts at token ``context``
    mean = float(cont.double().mean())
    return {
        "mean_nll": mean, "ppl": math.exp(mean), "n_scored_tokens": int(cont.numel()), "context": context,
        "cache_len_end": stats["cache_len_end"], "cache_len_peak": stats["cache_len_peak"], "seconds": seconds,
        "segment": segment,
        "segment_nll": [float(cont[s:s + segment].double().mean()) for s in range(0, cont.numel(), segment)],
    }


# --- part (ii): greedy generation ----------------------------------------------------------------------------------


def generation_cell(model, prompt_ids: torch.Tensor, press, gen_tokens: int) -> dict:
    """Greedy generation of exactly ``gen_tokens`` tokens (EOS does not stop it; its first index is recorded)
    and the cache length after every generated token (after the press compressed, if it did)."""
    from kvpress_ext.runtime.generate import eos_token_ids, generate_ids

    seen = {}
    trace: list[int] = []

    def remember(module, args, kwargs):  # the cache generate_ids builds is only reachable through the model call
        seen["cache"] = kwargs.get("past_key_values", seen.get("cache"))

    handle = get_adapter(model).decoder(model).register_forward_pre_hook(remember, with_kwargs=True)
    try:
        start = time.perf_counter()
        gen = generate_ids(model, prompt_ids, press, max_new_tokens=gen_tokens, stop_at_eos=False,
                           on_token=lambda _tok: trace.append(cache_length(seen["cache"])))
        seconds = time.perf_counter() - start
    finally:
        handle.remove()
    eos = eos_token_ids(model)
    first_eos = next((i for i, t in enumerate(gen.generated_ids) if t in eos), None)
    return {"prompt_tokens": gen.prompt_tokens, "generated_ids": gen.generated_ids, "cache_len_trace": trace,
            "cache_len_end": gen.cache_len_final, "cache_len_peak": max(trace) if trace else 0,
            "first_eos_index": first_eos, "seconds": seconds, "decode_tok_per_s": gen.decode_tok_per_s}


def agreement(ids: list[int], reference: list[int]) -> dict:
    """Fraction of the reference's positions where ``ids`` has the same token, and the first position where they
    differ (None: identical over the reference's length)."""
    n = len(reference)
    if n == 0:
        return {"agreement": 1.0, "first_divergence": None}
    same = [i < len(ids) and ids[i] == reference[i] for i in range(n)]
    first = next((i for i, s in enumerate(same) if not s), None)
    return {"agreement": sum(same) / n, "first_divergence": first}


def chat_prompt_ids(tokenizer, prompt: str, use_chat_template: bool = True) -> torch.Tensor:
    """(1, n) ids of ``prompt`` as a user turn of the model's chat template (raw text after BOS without one)."""
    from kvpress_ext.runtime.chat import split_chat_prompt

    prefix, context, suffix = split_chat_prompt(tokenizer, prompt, use_chat_template=use_chat_template).ids(tokenizer)
    return torch.tensor([prefix + context + suffix])


# --- report --------------------------------------------------------------------------------------------------------


def relative_diff(value: float, reference: float) -> float:
    """(value - reference) / |reference| in percent."""
    return 100.0 * (value - reference) / abs(reference) if reference else float("nan")


def nll_table(records: list[dict], target_budget: int = 512, target_pct: float = 2.0) -> tuple[str, dict | None]:
    """A text table of the NLL cells and the target check (rkv at ``target_budget`` within ``target_pct`` % of
    full's NLL), or None when either cell is missing."""
    full = next((r for r in records if r["method"] == "full"), None)
    lines = [f"{'method':<24} {'budget':>6} {'mean NLL':>9} {'vs full':>8} {'cache end':>9} {'peak':>6} {'s':>7}"]
    for r in records:
        rel = f"{relative_diff(r['mean_nll'], full['mean_nll']):+.2f}%" if full else "-"
        lines.append(f"{r['method']:<24} {r['budget'] if r['budget'] else '-':>6} {r['mean_nll']:>9.4f} {rel:>8} "
                     f"{r['cache_len_end']:>9} {r['cache_len_peak']:>6} {r['seconds']:>7.1f}")
    rkv = next((r for r in records if r["method"] == "rkv" and r["budget"] == target_budget), None)
    target = None
    if full and rkv:
        rel = relative_diff(rkv["mean_nll"], full["mean_nll"])
        target = {"what": f"rkv at budget {target_budget} within {target_pct} % of full's NLL",
                  "relative_diff_pct": rel, "met": abs(rel) <= target_pct}
        lines.append(f"target: {target['what']}: {rel:+.2f}% -> {'met' if target['met'] else 'MISSED'}")
    return "\n".join(lines), target


def generation_table(records: list[dict]) -> str:
    lines = [f"{'method':<24} {'budget':>6} {'agreement':>9} {'1st diff':>8} {'cache end':>9} {'peak':>6} {'s':>7}"]
    for r in records:
        first = "-" if r.get("first_divergence") is None else str(r["first_divergence"])
        lines.append(f"{r['method']:<24} {r['budget'] if r['budget'] else '-':>6} {r.get('agreement', 1.0):>9.3f} "
                     f"{first:>8} {r['cache_len_end']:>9} {r['cache_len_peak']:>6} {r['seconds']:>7.1f}")
    return "\n".join(lines)


def plot_nll(records: list[dict], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for r in records:
        seg = r["segment"]
        xs = [r["context"] + (i + 0.5) * seg for i in range(len(r["segment_nll"]))]
        ax.plot(xs, r["segment_nll"], "k-" if r["method"] == "full" else "-", lw=2 if r["method"] == "full" else 1,
                label=f"{r['method']} {r['budget'] or ''}".strip())
    _finish(fig, ax, path, title, "token position (continuation)",
            f"mean NLL per {records[0]['segment'] if records else ''}-token segment")


def plot_cache(records: list[dict], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for r in records:
        ax.plot(range(1, len(r["cache_len_trace"]) + 1), r["cache_len_trace"],
                "k-" if r["method"] == "full" else "-", lw=2 if r["method"] == "full" else 1,
                label=f"{r['method']} {r['budget'] or ''} (agree {r.get('agreement', 1.0):.2f})".strip())
    _finish(fig, ax, path, title, "generated tokens", "cache length (entries per layer, mean)")


def _finish(fig, ax, path, title: str, xlabel: str, ylabel: str) -> None:
    """Labels, grid and legend of both plots, then the atomic save."""
    import matplotlib.pyplot as plt

    from kvpress_ext.storage.safe_write import save_figure

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


# --- command line --------------------------------------------------------------------------------------------------

QUICK = {"context": 64, "continuation": 192, "budgets": [48, 96], "gen_tokens": 48, "compression_interval": 16}


def build_parser():
    import argparse

    from kvpress_ext.cli.common import OneLineArgumentParser, add_model_argument, add_threads_argument, positive_int

    p = OneLineArgumentParser(prog="long_generation", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(p)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "auto"])
    p.add_argument("--part", choices=["nll", "gen", "both"], default="both",
                   help="nll: teacher-forced NLL (2e i); gen: greedy generation (2e ii)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--budgets", nargs="+", type=int, default=[256, 512, 1024], help="tokens kept (default: %(default)s)")
    p.add_argument("--compression_interval", type=positive_int, default=128,
                   help="rkv and DecodingPress: decoding steps between compressions (default: %(default)s)")
    p.add_argument("--text_file", default=None, help="text for part nll (default: ../shared/data/pride_and_prejudice.txt)")
    p.add_argument("--context", type=positive_int, default=512, help="prefilled tokens before the scored continuation")
    p.add_argument("--continuation", type=positive_int, default=2048, help="tokens scored (part nll)")
    p.add_argument("--decode_chunk_size", type=positive_int, default=1, help="continuation tokens per forward")
    p.add_argument("--segment", type=positive_int, default=256, help="tokens per point of the NLL plot")
    p.add_argument("--gen_tokens", type=positive_int, default=1000, help="tokens generated (part gen)")
    p.add_argument("--prompt", default=DEFAULT_GEN_PROMPT, help="user message of the generation prompt")
    p.add_argument("--target_budget", type=positive_int, default=512, help="budget of the rkv target check")
    p.add_argument("--output_dir", default="results/long_generation")
    p.add_argument("--quick", action="store_true",
                   help=f"tiny setting for tests (options given explicitly win): "
                        f"{', '.join(f'{k}={v}' for k, v in QUICK.items())}")
    p.add_argument("--max_seconds", type=float, default=None,
                   help="start no new cell after this many seconds (finished cells are kept; rerun to continue)")
    p.add_argument("--no_progress", action="store_true", help="no per-cell lines")
    add_threads_argument(p)
    return p


def _load_cell(path, settings: dict) -> dict | None:
    from kvpress_ext.storage.inputs import load_json
    from kvpress_ext.storage.safe_write import OWNER_KEY

    try:
        record = load_json(path.read_bytes(), str(path))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("settings") != settings:
        return None
    record.pop(OWNER_KEY, None)  # the file's ownership mark, not part of the record
    return record


def _run_part(part: str, grid: list[Cell], settings: dict, out, compute, say, on_update, deadline: float) -> int:
    """Compute (or reuse) every cell of ``part``; each cell's JSON is written when done and ``on_update(records)``
    rewrites the summary, so a run cut off by a time limit keeps what it finished. Returns the cells not run
    (none are started after ``deadline``, a ``time.monotonic()`` value)."""
    import json

    from kvpress_ext.storage.safe_write import write_output

    folder = out / part
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i, cell in enumerate(grid):
        path = folder / f"{cell.name}.json"
        record = _load_cell(path, settings)
        if record is None:
            if time.monotonic() > deadline:
                say(f"{part}: --max_seconds reached; {len(grid) - i} cell(s) not run (run the same command again "
                    "to continue)")
                return len(grid) - i
            press = build_press(cell.method, cell.budget, settings["compression_interval"])
            record = {"method": cell.method, "budget": cell.budget, "settings": settings, **compute(press)}
            write_output(path, json.dumps(record))
            say(f"{part} {cell.name}: done in {record['seconds']:.1f}s")
        else:
            say(f"{part} {cell.name}: reused {path}")
        records.append(record)
        on_update(records)
    return 0


def main(argv=None) -> int:
    import json
    import sys
    from pathlib import Path

    from kvpress_ext.cli.common import quiet_command_line
    from kvpress_ext.evaluation.perplexity import shared_dir, tokenize
    from kvpress_ext.evaluation.results import machine_load
    from kvpress_ext.runtime.models import load_model
    from kvpress_ext.runtime.threads import set_threads
    from kvpress_ext.storage.inputs import read_text_file
    from kvpress_ext.storage.safe_write import claim_output_dir, write_output

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:  # the tiny setting, except what the command line sets
        for key, value in QUICK.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    quiet_command_line("long_generation")
    set_threads(args.threads)
    torch.set_grad_enabled(False)

    def say(text):
        if not args.no_progress:
            print(text, flush=True)

    try:
        check_budgets(args.budgets)
        text_file = Path(args.text_file) if args.text_file else shared_dir() / "data" / "pride_and_prejudice.txt"
        if args.part in ("nll", "both") and not text_file.is_file():
            raise LongGenerationInputError(f"--text_file {text_file} does not exist; pass an existing UTF-8 text file.")
        out = claim_output_dir(args.output_dir)
        model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
        device = next(model.parameters()).device
        grid = cells(args.methods, args.budgets, args.target_budget)
        deadline = time.monotonic() + (args.max_seconds if args.max_seconds is not None else math.inf)
        common = {"model": args.model, "dtype": args.dtype, "compression_interval": args.compression_interval}
        summary = {"model": args.model, "device": str(device), "dtype": args.dtype, "command": " ".join(sys.argv),
                   "machine_load_start": machine_load()}
        if args.part in ("nll", "both"):
            n = args.context + args.continuation
            ids = tokenize(tokenizer, read_text_file(text_file, "--text_file"), max_tokens=n)
            if ids.shape[1] < n:
                raise LongGenerationInputError(f"--text_file {text_file} has {ids.shape[1]} tokens; --context + "
                                               f"--continuation needs {n}. Pass a longer text or smaller values.")
            ids = ids.to(device)
            settings = {**common, "text_file": text_file.name, "context": args.context,
                        "continuation": args.continuation, "decode_chunk_size": args.decode_chunk_size}
            final = {}

            def nll_update(records):
                final["table"], target = nll_table(records, args.target_budget)
                write_output(out / "nll_summary.json", json.dumps(
                    {**summary, "settings": settings, "target": target, "records": records}, indent=1))
                plot_nll(records, out / "nll.png", f"{args.model}: NLL of {args.continuation} continuation tokens "
                         f"after {args.context} ({text_file.name})")

            _run_part("nll", grid, settings, out, lambda press: nll_cell(
                model, ids, args.context, press, args.decode_chunk_size, args.segment), say, nll_update, deadline)
            print(final.get("table", "nll: no cell finished"))
        if args.part in ("gen", "both"):
            prompt = chat_prompt_ids(tokenizer, args.prompt, args.use_chat_template).to(device)
            settings = {**common, "prompt": args.prompt, "chat_template": args.use_chat_template,
                        "gen_tokens": args.gen_tokens}
            final = {}

            def gen_update(records):
                full = next((r for r in records if r["method"] == "full"), None)
                for r in records:
                    r.update(agreement(r["generated_ids"], full["generated_ids"]) if full else {})
                final["table"] = generation_table(records)
                final["start"] = tokenizer.decode(full["generated_ids"][:60]) if full else None
                write_output(out / "gen_summary.json", json.dumps({**summary, "settings": settings,
                                                                   "records": records}))
                plot_cache(records, out / "gen_cache.png", f"{args.model}: cache length while generating "
                           f"{args.gen_tokens} tokens greedily")

            _run_part("gen", grid, settings, out, lambda press: generation_cell(model, prompt, press, args.gen_tokens),
                      say, gen_update, deadline)
            print(final.get("table", "gen: no cell finished"))
            if final.get("start"):
                print("full-cache generation starts:", repr(final["start"]))
    except KVPressExtError as exc:
        print(f"long_generation: error: {exc}", file=sys.stderr)
        return 2
    return 0
