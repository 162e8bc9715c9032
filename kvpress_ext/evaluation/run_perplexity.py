"""The perplexity/speed/memory evaluation behind ``evaluation/perplexity.py``: one run or a sweep over presses.

:class:`PerplexityConfig` holds every setting as plain values (the command line in
:mod:`kvpress_ext.cli.perplexity` builds one from its arguments); :func:`run` evaluates it. Bad input (unknown
press, missing file, ratio out of range, a parameter the press lacks, an unsupported model) raises
:class:`~kvpress_ext.errors.KVPressExtError`, which the command line prints on one line with exit status 2.

One press is run next to the uncompressed baseline (``no_press``, unless ``no_baseline``) and printed as a
table (:func:`format_table`): perplexity and its change, what the press kept (its setting, the cache entries and
bytes left against the same tokens uncompressed), decode speed and time to first token, with the thread count
and how busy the machine was. A sweep (``press="all"``) first tries every press on a short piece of the text in
the sweep's mode and lists those that cannot run there, with the reason, before the sweep starts.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
import textwrap
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import DynamicCache

from kvpress_ext import hub
from kvpress_ext.errors import KVPressExtError, NoCompressionWarning, PressParameterError, PressSkippedWarning
from kvpress_ext.evaluation import perplexity as ppl
from kvpress_ext.evaluation import results
from kvpress_ext.evaluation.speed import measure_speed
from kvpress_ext.models import DEFAULT_MODEL, load_model
from kvpress_ext.registry import (
    DEFAULT_COMPRESSION_RATIO,
    available_presses,
    get_press,
    press_info,
    press_name,
    validate_parameters,
)
from kvpress_ext.safe_io import check_output_dir
from kvpress_ext.threads import set_threads, threads_text


@dataclass
class PerplexityConfig:
    """Every setting of one perplexity/speed evaluation; the command-line options have the same names.

    The defaults run offline within 3 minutes on 2 CPU cores (first conversion of the model included):
    ``smollm2-135m`` on the first 1,024 tokens of a local text (the shared WikiText-2 test file, else Pride and
    Prejudice) in two 512-token windows, speed from one timed run (after a warm-up) of a 512-token prefill and 32
    decoded tokens; the hub data sets are used only when asked for (``--dataset wikitext`` / ``pg19``). A press
    sized by a token budget gets ``(1 - compression_ratio) * context_limit`` (256 tokens at the default 0.5).
    """

    model: str = DEFAULT_MODEL
    dataset: str = "text"
    subset: str = "wikitext-2-raw-v1"
    split: str = "test"
    sample_idx: int = 0
    text_file: str | None = None
    context_limit: int = 512
    max_eval_tokens: int | None = 1024
    press: str = "no_press"
    compression_ratio: float = DEFAULT_COMPRESSION_RATIO
    press_kwargs: dict = field(default_factory=dict)
    ppl_apply_press: bool = False
    chunk_size: int = 128
    decode_chunk_size: int = 1
    segment: int = 512
    speed_only: bool = False
    speed_decode_only: bool = False
    no_speed: bool = False
    speed_context: int | None = None
    max_new_tokens: int = 32
    min_new_tokens: int = 0
    num_runs: int = 1
    attn_implementation: str = "eager"
    device: str | None = None
    dtype: str = "auto"
    seed: int = 0
    threads: int | None = None
    output_dir: str = "results/perplexity"
    no_progress: bool = False
    no_baseline: bool = False
    command: str = field(default_factory=lambda: " ".join(shlex.quote(a) for a in sys.argv))

    @property
    def num_threads(self) -> int | None:
        """The former name of :attr:`threads`."""
        return self.threads


def check_ratio(ratio: float) -> None:
    if not 0 <= ratio < 1:
        raise PressParameterError(
            f"--compression_ratio {ratio} is out of range; it must be in [0, 1) (the fraction of the cache to remove)."
        )


def build_press(name: str, compression_ratio: float | None, press_kwargs: dict, context_length: int | None = None):
    """(press, ratio used or None): ``compression_ratio`` goes to presses that have it; a press with a token
    budget instead that defines ``from_compression_ratio(ratio, context_length, **kwargs)`` (lazy_streaming,
    rkv) gets the budget that keeps ``1 - ratio`` of a ``context_length``-token window; others keep theirs."""
    info = press_info(name)  # unknown names: error with close names
    if info.cls is type(None) or name == "no_press":
        if press_kwargs:
            raise PressParameterError(f"Press 'no_press' takes no parameters (got {', '.join(press_kwargs)}); leave them out "
                                      "or choose a press that compresses.")
        return None, None
    by_budget = getattr(info.cls, "from_compression_ratio", None)
    budget_given = any(k in press_kwargs for k in getattr(info.cls, "budget_parameters", ()))
    if compression_ratio is not None and context_length and callable(by_budget) and not budget_given:
        validate_parameters(info.cls, {**info.defaults, **press_kwargs}, name)
        return by_budget(compression_ratio, context_length, **{**info.defaults, **press_kwargs}), compression_ratio
    # Only to presses that have a ratio (their own or forwarded, as AdaKV's): a decoding press's scorer ratio is
    # overridden by its target size, so passing it there would only report a ratio that was not used.
    has_ratio = any(p.name == "compression_ratio" for p in info.parameters) or hasattr(info.cls, "compression_ratio")
    if compression_ratio is not None and "compression_ratio" not in press_kwargs and has_ratio:
        try:
            return get_press(name, compression_ratio=compression_ratio, **press_kwargs), compression_ratio
        except PressParameterError as exc:
            if "'compression_ratio'" not in str(exc):
                raise
    return get_press(name, **press_kwargs), press_kwargs.get("compression_ratio")


def press_params(press) -> dict:
    """A press's dataclass fields, inner presses as {name, params}, for the JSON record."""
    if press is None or not dataclasses.is_dataclass(press):
        return {}
    out = {}
    for f in dataclasses.fields(press):
        if not f.init or f.name.startswith("_"):
            continue
        v = getattr(press, f.name, None)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            v = {"name": press_name(v), "params": press_params(v)}
        elif isinstance(v, (list, tuple)) and any(dataclasses.is_dataclass(x) for x in v):
            v = [{"name": press_name(x), "params": press_params(x)} for x in v]
        elif isinstance(v, torch.Tensor) or callable(v):
            v = repr(v)[:80]
        out[f.name] = v
    return out


def evaluate_press(model, input_ids: torch.Tensor, press, args: PerplexityConfig) -> dict:
    """Perplexity (with or without the press), speed and memory of one press on one text."""
    progress = not args.no_progress
    record: dict = {"status": "ok"}
    if not (args.speed_only or args.speed_decode_only):
        t0 = time.perf_counter()
        if args.ppl_apply_press:
            nll, stats = ppl.compressed_nll(model, input_ids, press, args.context_limit, args.chunk_size,
                                            args.decode_chunk_size, progress)
            record["cache"] = {**stats, "measured_by": "perplexity run (last window)"}
        else:
            nll = ppl.teacher_forced_nll(model, input_ids, args.context_limit, progress)
        record["perplexity"] = ppl.perplexity_summary(nll, args.segment)
        record["perplexity"]["seconds"] = time.perf_counter() - t0
        record["perplexity"]["press_applied"] = bool(args.ppl_apply_press and press is not None)
    if not args.no_speed:
        n = args.speed_context or min(args.context_limit, input_ids.shape[1])
        record["speed"] = measure_speed(model, input_ids[:, :n], press, args.max_new_tokens, args.min_new_tokens,
                                        args.num_runs, args.speed_decode_only, progress)
        cache = record.setdefault("cache", {})
        if "cache_bytes_end" not in cache:  # no perplexity under the press: the speed run's cache is the measure
            cache.update(cache_bytes_end=record["speed"]["cache_bytes_end"], cache_len_end=record["speed"]["cache_len_end"],
                         tokens_end=record["speed"]["context_tokens"] + record["speed"]["runs"][-1]["decode_steps"],
                         measured_by="speed run (prefill + decode)")
        else:
            cache.setdefault("measured_by", "perplexity run (last window)")
        record["cache"]["speed_cache_bytes_after_prefill"] = record["speed"]["cache_bytes_after_prefill"]
        record["cache"]["speed_cache_bytes_end"] = record["speed"]["cache_bytes_end"]
        record["memory"] = {k: record["speed"][k] for k in ("peak_memory_bytes", "peak_memory_kind")}
    return record


def _needs_other_attention(exc: Exception) -> bool:
    text = str(exc).lower()
    return isinstance(exc, AssertionError) and ("attention" in text or "eager" in text)


def evaluate_with_fallback(model, input_ids, press, args) -> dict:
    """:func:`evaluate_press`; a press that asserts on the attention implementation (some need eager attention
    weights, others refuse them) is retried once with the other one (eager <-> sdpa), and the record says so."""
    current = model.config._attn_implementation
    try:
        return evaluate_press(model, input_ids, press, args)
    except AssertionError as exc:
        if not _needs_other_attention(exc) or current not in ("eager", "sdpa"):
            raise
        other = "sdpa" if current == "eager" else "eager"
        model.set_attn_implementation(other)
        try:
            record = evaluate_press(model, input_ids, press, args)
        finally:
            model.set_attn_implementation(current)
        record["attn_implementation"] = other
        record["note"] = f"retried with attn_implementation={other}: {exc}"
        return record


def _base_record(args, model, input_ids, device) -> dict:
    return {
        "model": {"name": args.model, "model_type": model.config.model_type, "dtype": str(model.dtype),
                  "attn_implementation": args.attn_implementation,
                  "num_parameters": sum(p.numel() for p in model.parameters())},
        "data": {"dataset": args.dataset, "subset": args.subset if args.dataset == "wikitext" else None,
                 "split": args.split if args.dataset != "text" else None,
                 "sample_idx": args.sample_idx if args.dataset == "pg19" else None, "text_file": args.text_file,
                 "n_tokens": int(input_ids.shape[1]), "context_limit": args.context_limit,
                 "max_eval_tokens": args.max_eval_tokens},
        "settings": {"ppl_apply_press": args.ppl_apply_press, "chunk_size": args.chunk_size,
                     "decode_chunk_size": args.decode_chunk_size, "segment": args.segment, "seed": args.seed,
                     "speed_only": args.speed_only, "speed_decode_only": args.speed_decode_only},
        "versions": results.library_versions(),
        "environment": results.device_info(device),
        "git_commit": results.git_commit(),
        "command": args.command,
    }


def kv_bytes_per_token(model) -> int:
    """Bytes one token adds to an uncompressed cache of ``model`` (keys and values over all layers), measured."""
    device = next(model.parameters()).device
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1]], device=device), past_key_values=cache)
    return ppl.cache_bytes(cache)


def kept_summary(record: dict, bytes_per_token: int) -> dict | None:
    """What a press kept: cache entries and bytes left against the same tokens uncompressed, and the effective
    compression ratio (by bytes, so channel presses such as ThinK count too)."""
    cache = record.get("cache") or {}
    if cache.get("cache_bytes_end") is None or not cache.get("tokens_end"):
        return None
    uncompressed = cache["tokens_end"] * bytes_per_token
    fraction = cache["cache_bytes_end"] / uncompressed if uncompressed else None
    return {"cache_len": cache.get("cache_len_end"), "tokens": cache["tokens_end"], "kv_bytes": cache["cache_bytes_end"],
            "kv_bytes_uncompressed": uncompressed, "kv_fraction": fraction,
            "effective_ratio": None if fraction is None else max(0.0, 1 - fraction),
            "compressed": fraction is not None and fraction < 0.999, "measured_by": cache.get("measured_by")}


def press_setting(name: str, press, ratio) -> str:
    """How the press was asked to compress, in words for the table (never ``ratio=None``)."""
    if press is None:
        return "uncompressed" if name == "no_press" else "-"
    budget = [k for k in getattr(type(press), "budget_parameters", ()) if getattr(press, k, None) is not None]
    if budget:
        extra = [k for k in ("slack",) if getattr(press, k, None) is not None]
        text = ", ".join(f"{k}={getattr(press, k)}" for k in budget + extra)
        return f"{text} (from compression_ratio={ratio})" if ratio is not None else text
    if ratio is not None:
        return f"compression_ratio={ratio}"
    inner = getattr(press, "presses", None)
    if isinstance(inner, (list, tuple)) and inner:  # a composition: each press's own setting, in order
        return " then ".join(f"{press_name(p)} ({press_setting(press_name(p), p, None)})" for p in inner)
    params = press_params(press)
    sized = {k: v for k, v in params.items() if any(w in k for w in ("ratio", "budget", "target_size", "window", "cap"))
             and not isinstance(v, (dict, list))}
    return ", ".join(f"{k}={v}" for k, v in sized.items()) or "its own rule (no ratio or budget)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}".rstrip(": ")


def probe_support(model, input_ids, press, args: PerplexityConfig) -> str | None:
    """Why ``press`` cannot run in the mode ``args`` describe, found by running it on a short piece of the text
    (two chunks of the perplexity run, a prefill and two decoded tokens of the speed run), or None if it can.

    A press that raises, or that leaves an input uncompressed because it cannot handle it (a prefill-only press
    shown a second chunk), is unsupported in that mode; the reason is its own message, first line. When it fails
    on chunks but works on one whole prefill, the reason says so and names the mode it can run in."""
    from kvpress_ext.evaluation.speed import _one_run

    n = min(args.context_limit, input_ids.shape[1])
    device = next(model.parameters()).device
    chunked = args.ppl_apply_press and not (args.speed_only or args.speed_decode_only)

    def perplexity_part():
        probe = input_ids[:, : min(n, 2 * args.chunk_size)]
        ppl.compressed_nll(model, probe, press, probe.shape[1], args.chunk_size, args.decode_chunk_size)

    def speed_part():
        _one_run(model, input_ids[:, : min(args.speed_context or n, input_ids.shape[1])].to(device), press, 3, 0)

    parts = ([perplexity_part] if chunked else []) + ([] if args.no_speed else [speed_part])
    reason = _try(model, press, parts)
    if reason and chunked and _try(model, press, [speed_part]) is None:
        return (f"works on one whole prefill but not on a text fed in chunks into a compressed cache ({reason}); "
                "evaluate it without --ppl_apply_press")
    return reason


def _try(model, press, steps) -> str | None:
    """Run ``steps`` under ``press`` (retrying once with the other attention kernel, as the sweep does); the first
    line of what went wrong, or None. A :class:`PressSkippedWarning` (input left uncompressed) counts as wrong."""
    current = model.config._attn_implementation

    def attempt() -> str | None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PressSkippedWarning)
            for step in steps:
                step()
        for w in caught:
            if issubclass(w.category, PressSkippedWarning):
                return str(w.message).split(" (", 1)[-1].split("); ")[0]
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return None

    try:
        try:
            return attempt()
        except AssertionError as exc:
            if not _needs_other_attention(exc) or current not in ("eager", "sdpa"):
                raise
            model.set_attn_implementation("sdpa" if current == "eager" else "eager")
            try:
                return attempt()
            finally:
                model.set_attn_implementation(current)
    except Exception as exc:  # noqa: BLE001 - any failure makes the press unsupported here; its message says why
        return _first_line(exc)
    finally:
        if hasattr(press, "reset"):
            press.reset()
        if hasattr(press, "_kvpress_ext_skip_warned"):
            del press._kvpress_ext_skip_warned


def mode_text(args: PerplexityConfig) -> str:
    if args.speed_only or args.speed_decode_only:
        return "speed only"
    mode = (f"--ppl_apply_press (chunks of {args.chunk_size} tokens into a compressed cache)" if args.ppl_apply_press
            else "perplexity without the press, speed with it")
    return mode + ("" if args.no_speed else " + speed")


def run(args: PerplexityConfig) -> list[dict]:
    """Run the evaluation described by ``args``; returns the records written (also printed)."""
    check_ratio(args.compression_ratio)
    for name in ("context_limit", "chunk_size", "decode_chunk_size", "segment", "num_runs", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise KVPressExtError(f"--{name} must be a positive integer, got {getattr(args, name)}.")
    if args.threads is not None and args.threads < 1:
        raise KVPressExtError(f"--threads must be a positive integer, got {args.threads}.")
    kwargs = dict(args.press_kwargs)
    sweep = args.press == "all"
    # Check the press and the input before loading anything heavy.
    if not sweep:
        press, ratio = build_press(args.press, args.compression_ratio, kwargs, args.context_limit)
        jobs = [(args.press, press, ratio, None)]
        if args.press != "no_press" and not args.no_baseline:  # after the press: a press that fails writes nothing
            jobs.append(("no_press", None, None, None))
    elif kwargs:
        raise PressParameterError("--press_kwargs cannot be combined with --press all (each press has its own): "
                                  "drop --press_kwargs, or run one --press NAME with them.")
    text = ppl.load_text(args.dataset, args.subset, args.split, args.sample_idx, args.text_file)
    check_output_dir(args.output_dir)
    torch.manual_seed(args.seed)
    threads = set_threads(args.threads)
    load_start = results.machine_load()
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype,
                                  attn_implementation=args.attn_implementation)
    device = next(model.parameters()).device
    input_ids = ppl.tokenize(tokenizer, text, args.max_eval_tokens)
    base = _base_record(args, model, input_ids, device)
    base["environment"].update(threads=threads, load_start=load_start)
    per_token = kv_bytes_per_token(model)
    if sweep:
        jobs = sweep_jobs(args.compression_ratio, args.context_limit)
        jobs = _check_sweep(model, input_ids, jobs, args)
    records = []
    for name, press, ratio, skip in jobs:
        record = {**base, "press": {"name": name, "compression_ratio": ratio, "setting": press_setting(name, press, ratio),
                                    "params": press_params(press)},
                  "mode": "ppl_apply_press" if args.ppl_apply_press else None}
        if skip:
            status, _, reason = skip.partition(": ") if skip.startswith(("skipped: ", "unsupported: ")) else ("skipped", "", skip)
            record.update(status=status, error=reason)
        else:
            if not args.no_progress:
                print(f"[{name}] {record['press']['setting']}", file=sys.stderr)
            try:
                with hub.explain_press_failures(name):  # needs hub files offline: one line naming the fix
                    record.update(evaluate_with_fallback(model, input_ids, press, args))
            except Exception as exc:
                if not sweep:
                    raise
                record.update(status="failed", error=_first_line(exc))
                record["traceback"] = traceback.format_exc(limit=4)
            record["kept"] = kept_summary(record, per_token)
        record["environment"] = {**base["environment"], "load_end": results.machine_load()}
        record["json_path"] = str(results.write_json(record, args.output_dir))
        records.append(record)
        if sweep:
            print(format_line(record, _baseline(records)), flush=True)
    if sweep:
        md, png = results.write_summary(records, args.output_dir, command=base["command"])
        print(f"wrote {md}" + (f" and {png}" if png else ""))
    else:
        print(format_table(records))
    return records


def _baseline(records: list[dict]) -> dict | None:
    return next((r for r in records if r["press"]["name"] == "no_press" and r["status"] == "ok"), None)


def _check_sweep(model, input_ids, jobs: list[tuple], args: PerplexityConfig) -> list[tuple]:
    """Try every press of a sweep in the sweep's mode before it starts; print those that cannot run, with why."""
    checked, unsupported, skipped = [], [], []
    for name, press, ratio, skip in jobs:
        if skip:
            skipped.append((name, skip))
            checked.append((name, press, ratio, f"skipped: {skip}"))
            continue
        reason = probe_support(model, input_ids, press, args) if press is not None else None
        if reason:
            unsupported.append((name, reason))
            checked.append((name, press, ratio, f"unsupported: {reason}"))
        else:
            checked.append((name, press, ratio, None))
    print(f"{len(checked) - len(unsupported) - len(skipped)} of {len(checked)} presses run in this mode "
          f"({mode_text(args)}).")
    if unsupported:
        print(f"Unsupported in this mode ({len(unsupported)}):")
        for name, reason in unsupported:
            print(f"  {name}: {reason}")
    if skipped:
        print(f"Skipped ({len(skipped)}; they need something not available here):")
        for name, reason in skipped:
            print(f"  {name}: {reason}")
    sys.stdout.flush()
    return checked


def sweep_jobs(compression_ratio: float, context_length: int | None = None) -> list[tuple]:
    """Every registered press built with its registry defaults (+ the ratio where it applies); a press that needs
    something unavailable, or fails to build, is kept with the reason instead of a press."""
    jobs = []
    for name, info in available_presses().items():
        if info.requires:
            jobs.append((name, None, None, f"requires {info.requires}"))
            continue
        try:
            with warnings.catch_warnings():  # a sweep at ratio 0 is a choice, not a mistake
                warnings.simplefilter("ignore", NoCompressionWarning)
                press, ratio = build_press(name, compression_ratio, {}, context_length)
        except Exception as exc:  # noqa: BLE001
            jobs.append((name, None, None, f"cannot be built from its name alone: {_first_line(exc)}"))
            continue
        jobs.append((name, press, ratio, None))
    return sorted(jobs, key=lambda job: job[0] != "no_press")  # the baseline first: every later line compares to it


def _mib(n_bytes) -> str:
    return "-" if n_bytes is None else f"{n_bytes / 2**20:.2f} MiB"


def _kept_text(record: dict) -> str:
    """``248/512 (ratio 0.52)``: cache entries per layer left of the tokens seen, and the effective ratio."""
    kept = record.get("kept")
    if not kept:
        return "-"
    text = f"{kept['cache_len']}/{kept['tokens']}" if kept.get("cache_len") is not None else f"?/{kept['tokens']}"
    text += f" (ratio {kept['effective_ratio']:.2f})"
    if not kept["compressed"] and record["press"]["name"] != "no_press":
        text += " did not compress"
    return text


def _kv_text(record: dict) -> str:
    """``0.30 MiB (48 %)``: key/value bytes held, and their share of the same tokens uncompressed."""
    kept = record.get("kept")
    if not kept:
        return "-"
    return f"{_mib(kept['kv_bytes'])} ({kept['kv_fraction'] * 100:.0f} %)"


def _ppl_text(record: dict, baseline: dict | None) -> str:
    p = record.get("perplexity")
    if not p:
        return "-"
    text = f"{p['ppl']:.4f}"
    ref = (baseline or {}).get("perplexity")
    if ref and record is not baseline:
        text += f" ({(p['ppl'] / ref['ppl'] - 1) * 100:+.2f} %)"
    return text


def format_line(record: dict, baseline: dict | None = None) -> str:
    """One line per record with units: press, its setting, perplexity (and change against ``baseline``), the KV
    cache kept (MiB, % of the same tokens uncompressed), decode speed, time to first token."""
    name, setting = record["press"]["name"], record["press"].get("setting") or "-"
    if record["status"] != "ok":
        return f"{name:26s} {record['status']}: {record.get('error')}"
    s = record.get("speed") or {}
    parts = [f"{name:26s}", setting, f"ppl {_ppl_text(record, baseline)}", f"kept {_kept_text(record)}",
             f"KV {_kv_text(record)} of uncompressed"]
    if s:
        parts.append(f"decode {s['decode_tok_per_s']:.1f} tok/s")
        if "ttft_s" in s:
            parts.append(f"TTFT {s['ttft_s'] * 1000:.1f} ms")
    return " | ".join(parts)


def format_table(records: list[dict]) -> str:
    """The runs of one evaluation as a table (the baseline first), what every column means, the thread count and
    machine load, and where the JSON files are."""
    baseline = _baseline(records)
    records = sorted(records, key=lambda r: r is not baseline)  # the baseline's row first
    header = ("press", "setting", "perplexity", "kept", "KV cache", "decode", "TTFT")
    rows = []
    for r in records:
        label = r["press"]["name"] + (" (baseline)" if r is baseline and len(records) > 1 else "")
        if r["status"] != "ok":
            rows.append((label, r["press"].get("setting") or "-", f"{r['status']}: {r.get('error')}", "", "", "", ""))
            continue
        s = r.get("speed") or {}
        rows.append((label, r["press"].get("setting") or "-", _ppl_text(r, baseline), _kept_text(r), _kv_text(r),
                     f"{s['decode_tok_per_s']:.1f} tok/s" if s else "-",
                     f"{s['ttft_s'] * 1000:.1f} ms" if s.get("ttft_s") is not None else "-"))
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    first = records[0]
    p = next((r.get("perplexity") for r in records if r.get("perplexity")), None)
    s = next((r.get("speed") for r in records if r.get("speed")), None)
    kept = next((r.get("kept") for r in records if r.get("kept")), None)
    notes = []
    if p:
        how = ("every token scored from the compressed cache, text fed in chunks" if first["settings"]["ppl_apply_press"]
               else "full context, the press not applied")
        notes.append(f"perplexity: over {p['n_scored_tokens']} predicted tokens in windows of "
                     f"{first['data']['context_limit']} ({how}); in brackets the change against the baseline.")
    if kept:
        notes.append(f"kept: cache entries per layer / tokens seen at the end of the {kept['measured_by']}, and the "
                     "effective compression ratio (1 - KV bytes / uncompressed bytes); KV cache: key/value bytes held "
                     "then, in MiB and as % of the same tokens uncompressed.")
    if s:
        notes.append(f"decode: greedy tokens/s after a {s['context_tokens']}-token prefill, median of {s['num_runs']} "
                     "runs; TTFT: time to first token (prefill + first token).")
    env = first.get("environment") or {}
    if env.get("threads"):
        device = env.get("device", "cpu")
        where = threads_text(env["threads"]) if str(device).startswith("cpu") else device
        notes.append(f"Timed on {where}; {results.load_text(env.get('load_start') or {}, env.get('load_end') or {})}.")
    folders = sorted({str(Path(r["json_path"]).parent) for r in records})
    notes.append(f"JSON in {', '.join(folders)}: " + ", ".join(Path(r["json_path"]).name for r in records))
    wrapped = [textwrap.fill(note, 110, subsequent_indent="  ", break_on_hyphens=False, break_long_words=False)
               for note in notes]
    return "\n".join(lines + [""] + wrapped)
