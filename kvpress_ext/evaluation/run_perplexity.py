"""The perplexity/speed/memory evaluation behind ``evaluation/perplexity.py``: argument parsing, one run, sweeps.

Bad input (unknown press, missing file, ratio out of range, a parameter the press lacks, an unsupported model)
raises :class:`~kvpress_ext.errors.KVPressExtError`; :func:`main` prints it on one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
import traceback

import torch

from kvpress_ext.errors import KVPressExtError, PressParameterError
from kvpress_ext.evaluation import perplexity as ppl
from kvpress_ext.evaluation import results
from kvpress_ext.evaluation.speed import measure_speed
from kvpress_ext.registry import available_presses, get_press, press_info, press_name, validate_parameters

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": "auto"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Perplexity, speed and memory of a model with and without KV-cache compression.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="EleutherAI/pythia-70m", help="hub id or local directory")
    p.add_argument("--dataset", default="wikitext", choices=ppl.DATASETS)
    p.add_argument("--subset", default="wikitext-2-raw-v1", help="dataset configuration (wikitext)")
    p.add_argument("--split", default="test")
    p.add_argument("--sample_idx", type=int, default=0, help="PG-19 book index")
    p.add_argument("--text_file", default=None, help="UTF-8 text for --dataset text")
    p.add_argument("--context_limit", type=int, default=4096, help="window length; each window starts a fresh cache")
    p.add_argument("--max_eval_tokens", type=int, default=None, help="evaluate only the first N tokens")
    p.add_argument("--press", default="no_press", help="registered press name, 'all', or 'no_press'")
    p.add_argument("--compression_ratio", type=float, default=0.5,
                   help="fraction of the cache to remove, for presses with a compression_ratio parameter")
    p.add_argument("--press_kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra press parameters (int/float/bool/none/str values)")
    p.add_argument("--ppl_apply_press", action="store_true",
                   help="score every token from the compressed cache (text fed chunk by chunk under the press)")
    p.add_argument("--chunk_size", type=int, default=128,
                   help="tokens per forward with --ppl_apply_press (window presses such as snapkv need more than their window)")
    p.add_argument("--decode_chunk_size", type=int, default=1,
                   help="tokens per forward after the first chunk, for presses that compress while decoding")
    p.add_argument("--segment", type=int, default=512, help="tokens per point of the NLL curve")
    p.add_argument("--speed_only", action="store_true", help="skip perplexity; measure speed and memory")
    p.add_argument("--speed_decode_only", action="store_true", help="skip perplexity; measure decode throughput only")
    p.add_argument("--no_speed", action="store_true", help="skip the speed measurement")
    p.add_argument("--speed_context", type=int, default=None,
                   help="prefill length for speed (default: min(context_limit, tokens))")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--min_new_tokens", type=int, default=0)
    p.add_argument("--num_runs", type=int, default=3, help="timed runs (median reported) after one warm-up")
    p.add_argument("--attn_implementation", default="eager", choices=("eager", "sdpa", "flash_attention_2"))
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=list(DTYPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_threads", type=int, default=None,
                   help="CPU threads for torch (1 is fastest for tiny models on a busy machine)")
    p.add_argument("--output_dir", default="results/perplexity")
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")
    p.add_argument("--summarize", metavar="DIR", default=None,
                   help="only rebuild summary.md/summary.png from the JSON files in DIR (e.g. an interrupted sweep)")
    return p


def parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_press_kwargs(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PressParameterError(f"--press_kwargs expects KEY=VALUE items, got {item!r}.")
        out[key] = parse_value(value)
    return out


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


def load_model(args):
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            args.model, dtype=DTYPES[args.dtype], attn_implementation=args.attn_implementation
        ).to(device).eval()
    except (OSError, ValueError, ImportError) as exc:
        raise KVPressExtError(
            f"Could not load model {args.model!r}: {str(exc).splitlines()[0][:200]}"
        ) from exc
    ppl.check_supported(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as exc:
        raise KVPressExtError(f"Could not load a tokenizer for {args.model!r}: {exc}") from exc
    return model, tokenizer


def evaluate_press(model, input_ids: torch.Tensor, press, args) -> dict:
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
        "command": " ".join(shlex.quote(a) for a in sys.argv),
    }


def run(args) -> list[dict]:
    """Run the evaluation described by parsed ``args``; returns the records written."""
    check_ratio(args.compression_ratio)
    for name in ("context_limit", "chunk_size", "decode_chunk_size", "segment", "num_runs", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise KVPressExtError(f"--{name} must be a positive integer, got {getattr(args, name)}.")
    kwargs = parse_press_kwargs(args.press_kwargs)
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
    model, tokenizer = load_model(args)
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
        _print_line(record)
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


def _print_line(record: dict) -> None:
    name, ratio = record["press"]["name"], record["press"]["compression_ratio"]
    if record["status"] != "ok":
        print(f"{name:28s} ratio={ratio} {record['status']}: {record.get('error')}")
        return
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
    print("  ".join(parts))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.summarize:
            md, png = results.summarize_directory(args.summarize)
            print(f"wrote {md}" + (f" and {png}" if png else ""))
            return 0
        run(args)
    except (KVPressExtError, FileNotFoundError) as exc:
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    return 0
