"""Shared loop of the long-context evaluations (LongBench, Needle-in-a-haystack, RULER).

Every sample's context is cut into chunks (paragraphs packed up to ``chunk_tokens`` tokens; longer
paragraphs are split), then answered by several *methods*:

* ``prefill``: a full prefill of ``prefix + chunks + question`` (the chunks' token ids concatenated, so it
  sees exactly the tokens the fusion sees), then greedy decoding;
* ``a3-<strategy>``: A3 / CacheBlend fusion of the separately precomputed chunk caches
  (:class:`kvpress_ext.presses.a3.A3Press`) at ``rate``, then greedy decoding from the fused cache;
* ``a3-<strategy>+<press>``: the same with eviction by a registered press after fusion (``evict=``).

With a chat template (unless ``--no_chat_template``) the prefix is the template's (system turn, user header) and
the question is asked as its suffix (blank line, question, assistant header), from
:func:`kvpress_ext.chat.split_chat_prompt`; without, the prefix is the BOS token and the question raw text.

Chunk caches are precomputed before the clock starts (A3 stores them offline), so a fusion's TTFT is
load + fuse + evict; the prefill's TTFT is its forward pass. TPOT is the mean time of the decoding
forwards after the first token. Each method's records go to ``<output_dir>/<method>.json`` and a table
of all methods to ``<output_dir>/summary.md``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kvpress_ext.safe_io import check_output_dir, claim_output_dir, save_figure, write_output

PREFILL = "prefill"


class InputError(Exception):
    """Bad command-line input: the CLIs print it on one line and exit with status 2."""


def shared_dir() -> Path:
    return Path(os.environ.get("KVPRESS_EXT_SHARED", Path(__file__).resolve().parents[2] / ".." / "shared"))


@dataclass
class Sample:
    """One question over one long context; ``answers`` are the accepted answers, ``meta`` goes to the JSON."""

    id: str
    context: str
    question: str
    answers: list[str]
    all_classes: list[str] | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class Method:
    name: str
    strategy: str | None = None  # None: full prefill
    evict: str | None = None


# --- inputs -----------------------------------------------------------------------------------------------
def parse_json_or_jsonl(text: str) -> list:
    """The items of a JSON list, or of JSON Lines (one value per non-empty line); json.JSONDecodeError if neither."""
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_records(path) -> list[dict]:
    """Records of a JSON list or a JSONL file."""
    from kvpress_ext.inputs import read_text_file

    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file not found: {path}; pass --data_file an existing JSON/JSONL file")
    try:
        records = parse_json_or_jsonl(read_text_file(path, "--data_file", "a UTF-8 JSON/JSONL file"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not JSON/JSONL ({e}); pass --data_file a JSON list or JSONL file") from None
    if not records or not all(isinstance(r, dict) for r in records):
        raise InputError(f"{path} holds no records; pass --data_file a JSON list or JSONL file of objects (one per line)")
    return records


def require_fields(records: list[dict], fields: tuple[str, ...], path) -> None:
    for i, r in enumerate(records):
        missing = [f for f in fields if f not in r]
        if missing:
            raise InputError(f"{path}: record {i} lacks field(s) {', '.join(missing)}; every record needs "
                             f"{', '.join(fields)}")


def parse_methods(strategies: list[str], evict: str | None) -> list[Method]:
    """``prefill`` plus one fusion method per strategy (and per strategy with eviction when ``evict``)."""
    from kvpress_ext.errors import KVPressExtError
    from kvpress_ext.presses.a3.press import STRATEGIES
    from kvpress_ext.registry import press_info

    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise InputError(f"unknown strategy {', '.join(bad)}; choose from {', '.join(STRATEGIES)}")
    if evict is not None:
        try:
            press_info(evict)
        except KVPressExtError as e:
            raise InputError(str(e).splitlines()[0]) from None
    methods = [Method(PREFILL)] + [Method(f"a3-{s}", s) for s in strategies]
    if evict is not None:
        methods += [Method(f"a3-{s}+{evict}", s, evict) for s in strategies]
    return methods


def load_model(name_or_path: str):
    """Model and tokenizer (eval mode) through :func:`kvpress_ext.models.load_model`; errors as :class:`InputError`."""
    from kvpress_ext.errors import KVPressExtError
    from kvpress_ext.models import load_model as load

    try:
        return load(name_or_path)
    except KVPressExtError as e:
        raise InputError(str(e).splitlines()[0]) from None


# --- chunking ---------------------------------------------------------------------------------------------
def chunk_context(tokenizer, context: str, chunk_tokens: int) -> list[list[int]]:
    """Token-id chunks of ``context``: paragraphs (blank-line separated) packed greedily up to
    ``chunk_tokens`` tokens each; a paragraph longer than that is split at token boundaries."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", context) if p.strip()]
    chunks, current = [], []
    for p in paragraphs:
        ids = list(tokenizer(p + "\n\n", add_special_tokens=False)["input_ids"])
        while len(ids) > chunk_tokens:
            if current:
                chunks.append(current)
                current = []
            chunks.append(ids[:chunk_tokens])
            ids = ids[chunk_tokens:]
        if current and len(current) + len(ids) > chunk_tokens:
            chunks.append(current)
            current = []
        current = current + ids
    if current:
        chunks.append(current)
    return chunks


def truncate_middle(chunks: list[list[int]], max_tokens: int | None) -> list[list[int]]:
    """Drop whole chunks from the middle until at most ``max_tokens`` remain (LongBench keeps head and tail)."""
    if max_tokens is None:
        return chunks
    chunks = list(chunks)
    while len(chunks) > 1 and sum(map(len, chunks)) > max_tokens:
        chunks.pop(len(chunks) // 2)
    if sum(map(len, chunks)) > max_tokens:
        chunks = [chunks[0][:max_tokens]]
    return chunks


# --- one answer -------------------------------------------------------------------------------------------
def _eos(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])


def _sync(model):
    if model.device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def answer(model, method: Method, bos: list[int], chunks: list[list[int]], question_ids: list[int],
           max_new_tokens: int, store=None, rate: float = 0.15, evict_kwargs: dict | None = None,
           sink_positions=None, selection_layer: int | None = None, keep_logits: bool = False) -> dict:
    """Greedy answer token ids of one method with ``ttft_s`` and ``tpot_s`` (None when one token).

    ``keep_logits=True`` also returns ``question_logits`` (n_question, vocab): the next-token logits at every
    question token, to compare a fusion's distributions with a full prefill's."""
    from transformers import DynamicCache

    from kvpress_ext.apply import apply_press
    from kvpress_ext.pipeline import greedy_decode
    from kvpress_ext.presses.a3 import A3Press

    extra = {}
    _sync(model)
    t0 = time.perf_counter()
    if method.strategy is None:
        cache = DynamicCache()
        ids = torch.tensor([bos + [t for c in chunks for t in c] + question_ids], device=model.device)
        with apply_press(None, model):
            all_logits = model(input_ids=ids, past_key_values=cache,
                               logits_to_keep=len(question_ids) if keep_logits else 1).logits[0]
    else:
        press = A3Press(strategy=method.strategy, rate=rate, store=store, evict=method.evict,
                        evict_kwargs=dict(evict_kwargs or {}) if method.evict else {},
                        sink_positions=sink_positions if method.strategy == "attnlink" else None,
                        selection_layer=selection_layer)
        result = press.fuse_result(model, chunks, question_ids)
        cache, all_logits = result.cache, result.logits
        extra = {"recomputed": int(result.selected.numel()), "cache_tokens": int(cache.get_seq_length()),
                 **{k: float(v) for k, v in result.timings.items()}}
    logits = all_logits[-1]
    first = int(logits.argmax())
    _sync(model)
    t1 = time.perf_counter()
    out = [first]
    if max_new_tokens > 1 and first not in _eos(model):
        with apply_press(None, model):
            out += greedy_decode(model, torch.tensor([[first]], device=model.device), cache, max_new_tokens - 1,
                                 _eos(model))
    _sync(model)
    t2 = time.perf_counter()
    steps = len(out) - 1
    if keep_logits:  # copied after the clock stops
        extra["question_logits"] = all_logits.float().cpu()
    return {"ids": out, "ttft_s": t1 - t0, "tpot_s": (t2 - t1) / steps if steps else None, **extra}


# --- the loop ---------------------------------------------------------------------------------------------
@dataclass
class RunConfig:
    name: str
    model: str
    strategies: list[str]
    rate: float = 0.15
    evict: str | None = None
    evict_ratio: float = 0.5
    max_samples: int | None = None
    max_new_tokens: int = 32
    chunk_tokens: int = 128
    max_context_tokens: int | None = None
    output_dir: str | None = None
    use_chat_template: bool = True
    extra: dict = field(default_factory=dict)


def run(cfg: RunConfig, model, tokenizer, samples: list[Sample], score: Callable[[Sample, str], dict],
        question_text: Callable[[Sample], str] | None = None, progress: bool = True) -> dict[str, dict]:
    """Answer every sample with every method; ``score(sample, prediction)`` returns named metrics, the first
    of which is the headline ``score``. Writes one JSON per method and ``summary.md``; returns the runs."""
    from tqdm.auto import tqdm

    from kvpress_ext.chat import split_chat_prompt
    from kvpress_ext.hub import explain_press_failures
    from kvpress_ext.presses.a3 import ChunkStore

    methods = parse_methods(cfg.strategies, cfg.evict)
    question_text = question_text or (lambda s: s.question)
    samples = samples[: cfg.max_samples] if cfg.max_samples else samples
    out_dir = claim_output_dir(cfg.output_dir or Path("results") / cfg.name)
    template = split_chat_prompt(tokenizer, "", "", use_chat_template=cfg.use_chat_template)
    store = ChunkStore(tempfile.mkdtemp(prefix=f"longcontext-{cfg.name}-"), model, tokenizer,
                       prefix_ids=template.ids(tokenizer)[0] if template.templated else None,
                       save_surprisal="surprisal_chunk" in cfg.strategies)
    bos = store.prefix_ids
    evict_kwargs = {"compression_ratio": cfg.evict_ratio}
    records = {m.name: [] for m in methods}
    bar = tqdm(total=len(samples) * len(methods), desc=cfg.name, disable=not progress, file=sys.stderr)
    for sample in samples:
        chunks = truncate_middle(chunk_context(tokenizer, sample.context, cfg.chunk_tokens), cfg.max_context_tokens)
        prompt = split_chat_prompt(tokenizer, "\n\n", question_text(sample), use_chat_template=cfg.use_chat_template)
        q_ids = list(tokenizer(prompt.suffix, add_special_tokens=False)["input_ids"])  # chunks end with a blank line
        store.precompute(chunks)  # offline step of A3: not part of the TTFT
        ends = [len(bos) + sum(map(len, chunks[: i + 1])) - 1 for i in range(len(chunks))]
        sinks = ends + [ends[-1] + len(q_ids)]
        for m in methods:
            with explain_press_failures(m.evict):  # an --evict press needing hub files offline: one line
                r = answer(model, m, bos, chunks, q_ids, cfg.max_new_tokens, store=store, rate=cfg.rate,
                           evict_kwargs=evict_kwargs, sink_positions=sinks)
            prediction = str(tokenizer.decode(r.pop("ids"), skip_special_tokens=True))
            metrics = score(sample, prediction)
            records[m.name].append({
                "id": sample.id, "prediction": prediction, "answers": sample.answers, **metrics,
                "score": next(iter(metrics.values())), "context_tokens": sum(map(len, chunks)),
                "n_chunks": len(chunks), "question_tokens": len(q_ids), **r, **sample.meta,
            })
            bar.update(1)
    bar.close()
    runs = {}
    config = {k: v for k, v in asdict(cfg).items()}
    for m in methods:
        recs = records[m.name]
        runs[m.name] = {
            "method": m.name, "strategy": m.strategy, "evict": m.evict,
            "rate": cfg.rate if m.strategy else None, "config": config, "summary": summarize(recs), "records": recs,
        }
        write_output(out_dir / f"{_safe(m.name)}.json", json.dumps(runs[m.name], indent=1), flag="--output_dir")
    write_output(out_dir / "summary.md", summary_markdown(cfg, runs), kind="markdown", flag="--output_dir")
    return runs


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(records: list[dict]) -> dict:
    return {"n": len(records), "score": _mean([r["score"] for r in records]),
            "ttft_s": _mean([r["ttft_s"] for r in records]), "tpot_s": _mean([r["tpot_s"] for r in records]),
            "context_tokens": _mean([r["context_tokens"] for r in records])}


def _fmt(x, scale=1.0, digits=3):
    return "-" if x is None else f"{x * scale:.{digits}f}"


def summary_markdown(cfg: RunConfig, runs: dict[str, dict]) -> str:
    lines = [f"# {cfg.name}: {cfg.model}", "",
             f"rate {cfg.rate}, chunk_tokens {cfg.chunk_tokens}, max_new_tokens {cfg.max_new_tokens}"
             + (f", evict {cfg.evict} (compression_ratio {cfg.evict_ratio})" if cfg.evict else ""), "",
             "| method | n | score | TTFT (ms) | TPOT (ms) | mean context tokens |", "|---|---|---|---|---|---|"]
    for name, run_ in runs.items():
        s = run_["summary"]
        lines.append(f"| {name} | {s['n']} | {_fmt(s['score'])} | {_fmt(s['ttft_s'], 1e3, 1)} | "
                     f"{_fmt(s['tpot_s'], 1e3, 2)} | {_fmt(s['context_tokens'], digits=0)} |")
    return "\n".join(lines) + "\n"


def cli_main(fn: Callable[[], object]) -> int:
    """Run ``fn``; an :class:`InputError` (or a press-parameter error) becomes one line on stderr and exit 2."""
    from kvpress_ext.errors import KVPressExtError

    try:
        fn()
    except (InputError, KVPressExtError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


def add_common_arguments(ap, name: str, default_chunk_tokens: int = 128) -> None:
    from kvpress_ext.cli.common import add_model_argument

    add_model_argument(ap)
    ap.add_argument("--strategies", nargs="+", default=["blend", "debug"], help="A3 fusion strategies")
    ap.add_argument("--rate", type=float, default=0.15, help="fraction of document tokens recomputed")
    ap.add_argument("--evict", default=None, help="registered press evicting from the fused cache, e.g. snapkv")
    ap.add_argument("--evict_ratio", type=float, default=0.5, help="compression_ratio of the --evict press")
    ap.add_argument("--max_samples", type=int, default=None, help="evaluate only the first N samples")
    ap.add_argument("--max_new_tokens", type=int, default=32, help="most answer tokens (greedy)")
    ap.add_argument("--chunk_tokens", type=int, default=default_chunk_tokens, help="tokens per separately cached chunk")
    ap.add_argument("--max_context_tokens", type=int, default=None, help="drop middle chunks beyond this")
    ap.add_argument("--output_dir", default=None, help=f"default results/{name}")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 avoids oversubscription)")
    ap.add_argument("--no_progress", action="store_true", help="hide progress bars")


def check_common(args) -> None:
    if not 0 <= args.rate <= 1:
        raise InputError(f"--rate {args.rate} must be in [0, 1]")
    for flag in ("max_new_tokens", "chunk_tokens"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag} must be a positive integer")
    if args.max_samples is not None and args.max_samples < 1:
        raise InputError("--max_samples must be a positive integer")
    parse_methods(args.strategies, args.evict)
    check_evict(args)
    if args.output_dir is not None:
        check_output_dir(args.output_dir)
    if args.threads >= 1:
        torch.set_num_threads(args.threads)


def config_from_args(args, name: str, **extra) -> RunConfig:
    return RunConfig(name=name, model=args.model, strategies=list(args.strategies), rate=args.rate, evict=args.evict,
                     evict_ratio=args.evict_ratio, max_samples=args.max_samples, max_new_tokens=args.max_new_tokens,
                     chunk_tokens=args.chunk_tokens, max_context_tokens=args.max_context_tokens,
                     output_dir=args.output_dir or str(Path("results") / name),
                     use_chat_template=args.use_chat_template, extra=extra)


def check_evict(args) -> None:
    """Build the eviction press once so a bad ``--evict_ratio`` fails before any model work."""
    if args.evict is not None:
        from kvpress_ext.registry import get_press

        get_press(args.evict, compression_ratio=args.evict_ratio)


# --- haystacks (Needle, RULER niah) ---------------------------------------------------------------------------
def load_haystack(directory) -> list[str]:
    """Sentences of the ``*.txt`` essays in ``directory`` (sorted by file name), whitespace-normalised."""
    directory = Path(directory)
    files = sorted(directory.glob("*.txt")) if directory.is_dir() else []
    if not files:
        raise InputError(f"no *.txt haystack files in {directory}; pass --haystack_dir a directory of UTF-8 .txt essays")
    from kvpress_ext.inputs import read_text_file

    text = " ".join(" ".join(read_text_file(f, "--haystack_dir file", "UTF-8 essays").split()) for f in files)
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


def build_haystack(tokenizer, sentences: list[str], length: int, depth: float, needle: str,
                   sentences_per_paragraph: int = 5) -> tuple[str, int]:
    """A context of about ``length`` tokens (sentences from the start of the haystack, cycled) with
    ``needle`` inserted at the sentence boundary closest to ``depth`` (0 = start, 1 = end) of it.
    Returns the text (paragraphs of a few sentences) and the needle's sentence index."""
    budget = length - len(tokenizer(needle, add_special_tokens=False)["input_ids"])
    picked, total, i = [], 0, 0
    lengths = {}
    while total < budget and i < 4 * len(sentences):  # sentences that overflow the budget are skipped
        s = sentences[i % len(sentences)]
        i += 1
        n = lengths.setdefault(s, len(tokenizer(" " + s, add_special_tokens=False)["input_ids"]))
        if total + n > budget:
            continue
        picked.append(s)
        total += n
    cumulative, acc = [0], 0
    for s in picked:
        acc += lengths[s]
        cumulative.append(acc)
    where = min(range(len(cumulative)), key=lambda k: abs(cumulative[k] - depth * total))
    picked.insert(where, needle)
    paragraphs = [" ".join(picked[k : k + sentences_per_paragraph])
                  for k in range(0, len(picked), sentences_per_paragraph)]
    return "\n\n".join(paragraphs), where


def plot_heatmaps(runs: dict[str, dict], depths: list[float], lengths: list[int], path) -> None:
    """One accuracy heat map (depth x length) per method, side by side, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(runs)
    fig, axes = plt.subplots(1, len(names), figsize=(2.2 + 1.0 * len(lengths) * len(names), 0.5 * len(depths) + 2),
                             squeeze=False)
    for ax, name in zip(axes[0], names):
        grid = accuracy_grid(runs[name]["records"], depths, lengths)
        im = ax.imshow([[float("nan") if v is None else v for v in row] for row in grid], vmin=0, vmax=1,
                       cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context tokens")
        ax.set_ylabel("needle depth")
        ax.set_title(name, fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="retrieval accuracy")
    save_figure(fig, path, flag="--output_dir", dpi=100)
    plt.close(fig)


def accuracy_grid(records: list[dict], depths: list[float], lengths: list[int]) -> list[list[float | None]]:
    """Mean score per (depth, length) cell, rows = depths; None where no sample."""
    grid = []
    for d in depths:
        row = []
        for n in lengths:
            xs = [r["score"] for r in records if r.get("depth") == d and r.get("length") == n]
            row.append(sum(xs) / len(xs) if xs else None)
        grid.append(row)
    return grid


def grid_markdown(runs: dict[str, dict], depths: list[float], lengths: list[int]) -> str:
    out = []
    for name, run_ in runs.items():
        out += [f"\n## {name}: accuracy by depth (rows) and length (columns)\n",
                "| depth | " + " | ".join(str(n) for n in lengths) + " |", "|---" * (1 + len(lengths)) + "|"]
        for d, row in zip(depths, accuracy_grid(run_["records"], depths, lengths)):
            out.append(f"| {d:.0%} | " + " | ".join(_fmt(v, digits=2) for v in row) + " |")
    return "\n".join(out) + "\n"
