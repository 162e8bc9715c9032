"""The perplexity/speed/memory evaluation behind ``evaluation/perplexity.py``: one run or a sweep over presses.

:class:`PerplexityConfig` holds every setting as plain values (the command line in
:mod:`kvpress_ext.cli.perplexity` builds one from its arguments); :func:`run` evaluates it. Bad input (unknown
press, missing file, ratio out of range, a parameter the press lacks, an unsupported model) raises
:class:`~kvpress_ext.errors.KVPressExtError`, which the command line prints on one line with exit status 2.

Several presses (or ``all``) x several ratios form a sweep: one cell per (press, ratio actually used), run by
:func:`run_cell` through :mod:`kvpress_ext.sweep` (``executor`` local or ray), each cell's JSON under
``output_dir/cells/``, resumable. A cell loads the model through a per-process cache, so a local sweep loads it
once and each Ray worker once.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from kvpress_ext.devices import input_device
from kvpress_ext.errors import KVPressExtError, PressParameterError
from kvpress_ext.evaluation import perplexity as ppl
from kvpress_ext.evaluation import results
from kvpress_ext.evaluation.speed import measure_speed
from kvpress_ext.models import load_model
from kvpress_ext.registry import available_presses, get_press, press_info, press_name, validate_parameters
from kvpress_ext.sweep import Cell, SweepOptions, cell_key, cell_path, run_sweep


@dataclass
class PerplexityConfig:
    """Every setting of one perplexity/speed evaluation; the command-line options have the same names."""

    model: str = "EleutherAI/pythia-70m"
    dataset: str = "wikitext"
    subset: str = "wikitext-2-raw-v1"
    split: str = "test"
    sample_idx: int = 0
    text_file: str | None = None
    context_limit: int = 4096
    max_eval_tokens: int | None = None
    press: str | list[str] = "no_press"  # several names (or "all") make a sweep
    compression_ratio: float | list[float] = 0.5  # several values make a sweep (cross product with press)
    press_kwargs: dict = field(default_factory=dict)
    ppl_apply_press: bool = False
    chunk_size: int = 128
    decode_chunk_size: int = 1
    segment: int = 512
    speed_only: bool = False
    speed_decode_only: bool = False
    no_speed: bool = False
    speed_context: int | None = None
    max_new_tokens: int = 200
    min_new_tokens: int = 0
    num_runs: int = 3
    attn_implementation: str = "eager"
    device: str | None = None
    device_map: str | dict | None = None  # accelerate: split the model over devices / CPU / disk
    max_memory: dict | None = None
    offload_folder: str | None = None
    dtype: str = "auto"
    seed: int = 0
    num_threads: int | None = None
    output_dir: str = "results/perplexity"
    no_progress: bool = False
    # how the cells of a sweep run (kvpress_ext.sweep.SweepOptions)
    executor: str = "local"
    max_retries: int = 1
    cell_gpus: float = 0.0
    cell_cpus: float = 1.0
    ray_address: str | None = None
    ray_num_cpus: int | None = None
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
                  "num_parameters": sum(p.numel() for p in model.parameters()),
                  "device_map": getattr(model, "hf_device_map", None)},
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


_SWEEP_FIELDS = ("executor", "max_retries", "cell_gpus", "cell_cpus", "ray_address", "ray_num_cpus")
_CONTEXT_FIELDS = ("command", "output_dir", "no_progress")  # do not change a cell's result
_MODELS: dict = {}
_TEXTS: dict = {}


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _cached_model(args: PerplexityConfig):
    """(model, tokenizer), loaded once per process for a given model/device/dtype (the last one only is kept)."""
    placement = {"device_map": args.device_map, "max_memory": args.max_memory, "offload_folder": args.offload_folder}
    key = json.dumps([args.model, args.device, args.dtype, args.attn_implementation, placement], default=str)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = load_model(args.model, device=args.device, dtype=args.dtype,
                                  attn_implementation=args.attn_implementation, **placement)
    return _MODELS[key]


def _cached_text(args: PerplexityConfig) -> str:
    key = (args.dataset, args.subset, args.split, args.sample_idx, args.text_file)
    if key not in _TEXTS:
        _TEXTS[key] = ppl.load_text(*key)
    return _TEXTS[key]


def _check_model(args: PerplexityConfig) -> None:
    """Fail before the sweep on a model that cannot load: locally by loading it (the cells reuse it), for Ray
    from its config only (the driver may have no GPU)."""
    if args.executor == "local":
        _cached_model(args)
        return
    from transformers import AutoConfig

    from kvpress_ext.adapters import get_adapter
    from kvpress_ext.errors import UnsupportedModelError
    from kvpress_ext.models import ModelLoadError, resolve_model

    try:
        config = AutoConfig.from_pretrained(resolve_model(args.model))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"Cannot load model {args.model!r}: {str(exc).strip().splitlines()[0][:300]}") from exc
    stand_in = type((config.architectures or ["Model"])[0], (), {"config": config})()
    try:
        get_adapter(stand_in)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(str(exc).split(". To add")[0] + ".") from exc


def _cell_params(args: PerplexityConfig, name: str, ratio, skip: str | None) -> dict:
    config = {f.name: getattr(args, f.name) for f in dataclasses.fields(PerplexityConfig)
              if f.name not in _SWEEP_FIELDS + _CONTEXT_FIELDS}
    config.update(press=name, compression_ratio=ratio)
    return {"config": config, "skip": skip, "_command": args.command, "_no_progress": args.no_progress}


def perplexity_cells(args: PerplexityConfig) -> list[Cell]:
    """One cell per (press, ratio the press actually uses): presses without a ratio get one cell, not one per
    ratio. Explicit names are built here, so a bad name or parameter fails before anything runs; ``all`` keeps
    presses that cannot run as cells that record why."""
    names, ratios = _as_list(args.press), _as_list(args.compression_ratio)
    kwargs = dict(args.press_kwargs)
    if "all" in names and kwargs:
        raise PressParameterError("--press_kwargs cannot be combined with --press all (each press has its own).")
    cells: dict = {}
    for ratio in ratios:
        jobs = []
        for name in names:
            if name == "all":
                jobs += [(n, r, skip) for n, _, r, skip in sweep_jobs(ratio, args.context_limit)]
            else:
                _, used = build_press(name, ratio, kwargs, args.context_limit)
                jobs.append((name, used, None))
        for name, used, skip in jobs:
            key = cell_key(name, r=used if used is not None else "none")
            cells.setdefault(key, Cell(key, _cell_params(args, name, ratio, skip)))
    return list(cells.values())


def run_cell(params: dict) -> dict:
    """The record of one (press, ratio) cell: what :func:`run` wrote per press before sweeps had cells."""
    args = PerplexityConfig(**params["config"], command=params.get("_command", ""),
                            no_progress=params.get("_no_progress", True))
    name = args.press
    mode = "ppl_apply_press" if args.ppl_apply_press else None
    if params.get("skip"):
        return {"press": {"name": name, "compression_ratio": None, "params": {}}, "mode": mode, "status": "skipped",
                "error": params["skip"], "data": {"dataset": args.dataset}, "command": args.command}
    press, ratio = build_press(name, args.compression_ratio, dict(args.press_kwargs), args.context_limit)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    model, tokenizer = _cached_model(args)
    input_ids = ppl.tokenize(tokenizer, _cached_text(args), args.max_eval_tokens)
    torch.manual_seed(args.seed)
    record = {**_base_record(args, model, input_ids, input_device(model)),
              "press": {"name": name, "compression_ratio": ratio, "params": press_params(press)}, "mode": mode}
    if not args.no_progress:
        print(f"[{name}] ratio={ratio}", file=sys.stderr)
    record.update(evaluate_with_fallback(model, input_ids, press, args))
    return record


def _failed_record(args: PerplexityConfig, cell_file: dict) -> dict:
    config = cell_file["params"]["config"]
    return {"press": {"name": config["press"], "compression_ratio": config["compression_ratio"], "params": {}},
            "mode": "ppl_apply_press" if args.ppl_apply_press else None, "status": "failed",
            "error": cell_file["error"], "errors": cell_file["errors"], "traceback": cell_file.get("traceback"),
            "data": {"dataset": args.dataset}, "command": args.command}


def sweep_options(args: PerplexityConfig) -> SweepOptions:
    return SweepOptions(executor=args.executor, max_retries=args.max_retries, cell_gpus=args.cell_gpus,
                        cell_cpus=args.cell_cpus, ray_address=args.ray_address, ray_num_cpus=args.ray_num_cpus,
                        progress=not args.no_progress)


def run(args: PerplexityConfig) -> list[dict]:
    """Run the evaluation described by ``args``; returns the records written (also printed, one line each).

    One cell (one press, one ratio) that fails raises :class:`KVPressExtError` with its reason; in a sweep the
    failed cells are recorded (cell file, summary) and the others go on."""
    for ratio in _as_list(args.compression_ratio):
        check_ratio(ratio)
    for name in ("context_limit", "chunk_size", "decode_chunk_size", "segment", "num_runs", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise KVPressExtError(f"--{name} must be a positive integer, got {getattr(args, name)}.")
    from kvpress_ext.sweep import check_options, import_ray

    check_options(sweep_options(args))
    if args.executor == "ray":
        import_ray()
    # Check the presses and the input before loading anything heavy.
    cells = perplexity_cells(args)
    sweeping = len(cells) > 1
    for cell in cells:  # a sweep shows one bar over its cells, not each cell's own bars
        cell.params["_no_progress"] = args.no_progress or sweeping
    options = sweep_options(args)
    options.progress = options.progress and sweeping
    _cached_text(args)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    _check_model(args)
    by_key: dict = {}

    def on_result(cell, cell_file, skipped):
        record = dict(cell_file["record"]) if cell_file["status"] == "ok" else _failed_record(args, cell_file)
        if not skipped:
            record["json_path"] = str(results.write_json(record, args.output_dir))
        by_key[cell.key] = record
        tqdm.write(format_line(record) + (" (done before)" if skipped else ""))  # above the sweep's bar

    outcome = run_sweep(cells, run_cell, args.output_dir, options, desc="perplexity", on_result=on_result)
    records = [by_key[c.key] for c in cells]
    if len(cells) == 1 and outcome.failed:
        cell_file = cell_path(args.output_dir, cells[0].key)
        raise KVPressExtError(f"{outcome.cells[cells[0].key]['error']} (traceback in {cell_file})")
    if sweeping:
        md, png = results.write_summary(records, args.output_dir, command=args.command)
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
