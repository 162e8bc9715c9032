"""The perplexity/speed/memory evaluation behind ``evaluation/perplexity.py``: one run or a sweep over presses.

:class:`PerplexityConfig` holds every setting as plain values (the command line in
:mod:`kvpress_ext.cli.perplexity` builds one from its arguments); :func:`run` evaluates it. Bad input (unknown
press, missing file, ratio out of range, a parameter the press lacks, an unsupported model) raises
:class:`~kvpress_ext.errors.KVPressExtError`, which the command line prints on one line with exit status 2.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch

from kvpress_ext.errors import KVPressExtError, PressParameterError
from kvpress_ext.evaluation import perplexity as ppl
from kvpress_ext.evaluation import results
from kvpress_ext.evaluation.speed import measure_speed
from kvpress_ext.models import DEFAULT_MODEL, load_model
from kvpress_ext.registry import available_presses, get_press, press_info, press_name, validate_parameters


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
    compression_ratio: float = 0.5
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
    num_threads: int | None = None
    output_dir: str = "results/perplexity"
    no_progress: bool = False
    command: str = field(default_factory=lambda: " ".join(shlex.quote(a) for a in sys.argv))


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
            raise PressParameterError(f"Press 'no_press' takes no parameters (got {', '.join(press_kwargs)}).")
        return None, None
    by_budget = getattr(info.cls, "from_compression_ratio", None)
    budget_given = any(k in press_kwargs for k in getattr(info.cls, "budget_parameters", ()))
    if compression_ratio is not None and context_length and callable(by_budget) and not budget_given:
        validate_parameters(info.cls, {**info.defaults, **press_kwargs}, name)
        return by_budget(compression_ratio, context_length, **{**info.defaults, **press_kwargs}), compression_ratio
    if compression_ratio is not None and "compression_ratio" not in press_kwargs:
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
            record["cache"] = stats
        else:
            nll = ppl.teacher_forced_nll(model, input_ids, args.context_limit, progress)
        record["perplexity"] = ppl.perplexity_summary(nll, args.segment)
        record["perplexity"]["seconds"] = time.perf_counter() - t0
        record["perplexity"]["press_applied"] = bool(args.ppl_apply_press and press is not None)
    if not args.no_speed:
        n = args.speed_context or min(args.context_limit, input_ids.shape[1])
        record["speed"] = measure_speed(model, input_ids[:, :n], press, args.max_new_tokens, args.min_new_tokens,
                                        args.num_runs, args.speed_decode_only, progress)
        record.setdefault("cache", {}).setdefault("cache_bytes_end", record["speed"]["cache_bytes_end"])
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


def run(args: PerplexityConfig) -> list[dict]:
    """Run the evaluation described by ``args``; returns the records written (also printed, one line each)."""
    check_ratio(args.compression_ratio)
    for name in ("context_limit", "chunk_size", "decode_chunk_size", "segment", "num_runs", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise KVPressExtError(f"--{name} must be a positive integer, got {getattr(args, name)}.")
    kwargs = dict(args.press_kwargs)
    # Check the press and the input before loading anything heavy.
    if args.press != "all":
        press, ratio = build_press(args.press, args.compression_ratio, kwargs, args.context_limit)
        jobs = [(args.press, press, ratio, None)]
    elif kwargs:
        raise PressParameterError("--press_kwargs cannot be combined with --press all (each press has its own).")
    text = ppl.load_text(args.dataset, args.subset, args.split, args.sample_idx, args.text_file)
    torch.manual_seed(args.seed)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype,
                                  attn_implementation=args.attn_implementation)
    device = next(model.parameters()).device
    input_ids = ppl.tokenize(tokenizer, text, args.max_eval_tokens)
    base = _base_record(args, model, input_ids, device)
    if args.press == "all":
        jobs = sweep_jobs(args.compression_ratio, args.context_limit)
    records = []
    for name, press, ratio, skip in jobs:
        record = {**base, "press": {"name": name, "compression_ratio": ratio, "params": press_params(press)},
                  "mode": "ppl_apply_press" if args.ppl_apply_press else None}
        if skip:
            record.update(status="skipped", error=skip)
        else:
            if not args.no_progress:
                print(f"[{name}] ratio={ratio}", file=sys.stderr)
            try:
                record.update(evaluate_with_fallback(model, input_ids, press, args))
            except Exception as exc:
                if args.press != "all":
                    raise
                record.update(status="failed", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
                record["traceback"] = traceback.format_exc(limit=4)
        record["json_path"] = str(results.write_json(record, args.output_dir))
        records.append(record)
        print(format_line(record))
    if args.press == "all":
        md, png = results.write_summary(records, args.output_dir, command=base["command"])
        print(f"wrote {md}" + (f" and {png}" if png else ""))
    return records


def sweep_jobs(compression_ratio: float, context_length: int | None = None) -> list[tuple]:
    """Every registered press built with its registry defaults (+ the ratio where it applies); a press that needs
    something unavailable, or fails to build, is kept with the reason instead of a press."""
    jobs = []
    for name, info in available_presses().items():
        if info.requires:
            jobs.append((name, None, None, f"requires {info.requires}"))
            continue
        try:
            press, ratio = build_press(name, compression_ratio, {}, context_length)
        except Exception as exc:  # noqa: BLE001
            jobs.append((name, None, None, f"cannot build with defaults: {type(exc).__name__}: {exc}"))
            continue
        jobs.append((name, press, ratio, None))
    return jobs


def format_line(record: dict) -> str:
    """One line per record: press, ratio, perplexity, KV bytes, decode speed, time to first token."""
    name, ratio = record["press"]["name"], record["press"]["compression_ratio"]
    if record["status"] != "ok":
        return f"{name:28s} ratio={ratio} {record['status']}: {record.get('error')}"
    p, s, c = record.get("perplexity") or {}, record.get("speed") or {}, record.get("cache") or {}
    parts = [f"{name:28s}", f"ratio={ratio}"]
    if p:
        parts.append(f"ppl={p['ppl']:.4f} ({p['n_scored_tokens']} tokens)")
    if c.get("cache_bytes_end") is not None:
        parts.append(f"kv_bytes={c['cache_bytes_end']}")
    if s:
        parts.append(f"decode={s['decode_tok_per_s']:.1f} tok/s")
        if "ttft_s" in s:
            parts.append(f"ttft={s['ttft_s'] * 1000:.1f} ms")
    return "  ".join(parts)
