"""The perplexity/speed/memory evaluation behind ``evaluation/perplexity.py``: one run or a sweep over presses.

:class:`PerplexityConfig` holds every setting as plain values (the command line in
:mod:`kvpress_ext.cli.perplexity` builds one from its arguments); :func:`run` evaluates it. Bad input (unknown
press, missing file, ratio out of range, a parameter the press lacks, an unsupported model) raises
:class:`~kvpress_ext.core.errors.KVPressExtError`, which the command line prints on one line with exit status 2.

Every run is a set of cells, one per (press, ratio the press actually uses), run by :func:`run_cell` through
:mod:`kvpress_ext.evaluation.sweep` (``executor`` local or ray), each cell's JSON under ``output_dir/cells/``, resumable. A
cell loads the model through a per-process cache, so a local run loads it once and each Ray worker once.

- One press: its cell, then the uncompressed baseline's (``no_press``, unless ``no_baseline``), printed as a table
  (:func:`format_table`): perplexity and its change, what the press kept (its setting, the cache entries and bytes
  left against the same tokens uncompressed), decode speed and time to first token, with the thread count and how
  busy the machine was. A press that fails raises its error and writes nothing (the baseline runs after it).
- Several presses and/or ratios (a cross product) or ``all``: a sweep, the baseline first, one line per cell and
  ``summary.md``; a failing cell is recorded with its reason and the others go on. ``all`` first tries every press
  on a short piece of the text in the sweep's mode (:func:`_check_sweep`, in this process, on its model) and lists
  those that cannot run there, with the reason, before the sweep starts; their cells record why.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import textwrap
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from kvpress_ext.core.contract import (
    budget_parameters,
    forget_skip_warning,
    from_compression_ratio,
    reset_press,
    sized_by_budget,
)
from kvpress_ext.core.devices import input_device
from kvpress_ext.core.errors import KVPressExtError, NoCompressionWarning, PressParameterError, PressSkippedWarning
from kvpress_ext.core.registry import (
    DEFAULT_COMPRESSION_RATIO,
    available_presses,
    get_press,
    press_info,
    press_name,
    validate_parameters,
)
from kvpress_ext.evaluation import perplexity as ppl
from kvpress_ext.evaluation import results
from kvpress_ext.evaluation.speed import measure_speed
from kvpress_ext.evaluation.sweep import Cell, SweepOptions, cell_key, run_sweep
from kvpress_ext.runtime import hub
from kvpress_ext.runtime.models import DEFAULT_MODEL, load_model, resolve_model
from kvpress_ext.runtime.threads import set_threads, threads_text
from kvpress_ext.storage.inputs import path_digest
from kvpress_ext.storage.safe_write import check_output_dir


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
    press: str | list[str] = "no_press"  # several names (or "all") make a sweep
    compression_ratio: float | list[float] = DEFAULT_COMPRESSION_RATIO  # several: a sweep (cross product with press)
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
    device_map: str | dict | None = None  # accelerate: split the model over devices / CPU / disk
    max_memory: dict | None = None
    offload_folder: str | None = None
    dtype: str = "auto"
    seed: int = 0
    threads: int | None = None
    output_dir: str = "results/perplexity"
    no_progress: bool = False
    no_baseline: bool = False
    # how the cells run (kvpress_ext.evaluation.sweep.SweepOptions)
    executor: str = "local"
    max_retries: int = 1
    cell_gpus: float = 0.0
    cell_cpus: float = 1.0
    ray_address: str | None = None
    ray_num_cpus: int | None = None
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
    budget_given = any(k in press_kwargs for k in budget_parameters(info.cls))
    if compression_ratio is not None and context_length and sized_by_budget(info.cls) and not budget_given:
        validate_parameters(info.cls, {**info.defaults, **press_kwargs}, name)
        press = from_compression_ratio(info.cls, compression_ratio, context_length, **{**info.defaults, **press_kwargs})
        return press, compression_ratio
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


def kv_bytes_per_token(model) -> int:
    """Bytes one token adds to an uncompressed cache of ``model`` (keys and values over all layers), measured."""
    device = input_device(model)
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
    budget = [k for k in budget_parameters(type(press)) if getattr(press, k, None) is not None]
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
    device = input_device(model)
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
        reset_press(press)
        forget_skip_warning(press)


def mode_text(args: PerplexityConfig) -> str:
    if args.speed_only or args.speed_decode_only:
        return "speed only"
    mode = (f"--ppl_apply_press (chunks of {args.chunk_size} tokens into a compressed cache)" if args.ppl_apply_press
            else "perplexity without the press, speed with it")
    return mode + ("" if args.no_speed else " + speed")


_SWEEP_FIELDS = ("executor", "max_retries", "cell_gpus", "cell_cpus", "ray_address", "ray_num_cpus")
_CONTEXT_FIELDS = ("command", "output_dir", "no_progress", "no_baseline", "threads")  # do not change a cell's result
_MODELS: dict = {}
_TEXTS: dict = {}


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _cached_model(args: PerplexityConfig):
    """(model, tokenizer, KV bytes per token), loaded once per process for a given model/device/dtype/placement
    (the last one only is kept)."""
    placement = {"device_map": args.device_map, "max_memory": args.max_memory, "offload_folder": args.offload_folder}
    key = json.dumps([args.model, args.device, args.dtype, args.attn_implementation, placement], default=str)
    if key not in _MODELS:
        _MODELS.clear()
        model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype,
                                      attn_implementation=args.attn_implementation, **placement)
        _MODELS[key] = (model, tokenizer, kv_bytes_per_token(model))
    return _MODELS[key]


def _cached_text(args: PerplexityConfig) -> str:
    key = (args.dataset, args.subset, args.split, args.sample_idx, args.text_file)
    if key not in _TEXTS:
        _TEXTS[key] = ppl.load_text(*key)
    return _TEXTS[key]


def _check_model(args: PerplexityConfig) -> None:
    """Fail before any cell on a model that cannot load: locally by loading it (the cells reuse it), for Ray
    from its config only (the driver may have no GPU)."""
    if args.executor == "local":
        _cached_model(args)
        return
    from transformers import AutoConfig

    from kvpress_ext.core.adapters import get_adapter
    from kvpress_ext.core.errors import UnsupportedModelError
    from kvpress_ext.runtime.models import MODEL_ALTERNATIVES, ModelLoadError, resolve_model

    source = resolve_model(args.model)
    hub.check_model_source(source, args.model, MODEL_ALTERNATIVES)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"Cannot load model {args.model!r}: {str(exc).strip().splitlines()[0][:300]}") from exc
    stand_in = type((config.architectures or ["Model"])[0], (), {"config": config})()
    try:
        get_adapter(stand_in)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(str(exc).split(". To add")[0] + ".") from exc


def input_digests(args: PerplexityConfig, threads: int) -> dict:
    """What decides a cell's numbers beyond its settings: the model's files, the text's bytes, the threads (speed)."""
    return {"model": path_digest(resolve_model(args.model)),
            "text": path_digest(args.text_file) if args.text_file else None, "threads": threads}


def _cell_params(args: PerplexityConfig, name: str, ratio, skip: str | None, press_kwargs: dict | None = None) -> dict:
    config = {f.name: getattr(args, f.name) for f in dataclasses.fields(PerplexityConfig)
              if f.name not in _SWEEP_FIELDS + _CONTEXT_FIELDS}
    config.update(press=name, compression_ratio=ratio,
                  press_kwargs=dict(args.press_kwargs if press_kwargs is None else press_kwargs))
    return {"config": config, "skip": skip, "_command": args.command, "_no_progress": args.no_progress,
            "_threads": args.threads}


def plan_cells(args: PerplexityConfig) -> tuple[list[Cell], list[Cell], bool]:
    """``(cells, cells to run after them, sweeping)``: one cell per (press, ratio the press actually uses), so
    presses without a ratio get one cell, not one per ratio. Explicit names are built here, so a bad name or
    parameter fails before anything runs; ``all`` keeps presses that cannot be built as cells that record why.

    The baseline (``no_press``) joins unless ``no_baseline`` or it is named: after one press (so a press that
    fails writes nothing), first in a sweep (every later line compares to it)."""
    names, ratios = _as_list(args.press), _as_list(args.compression_ratio)
    if not names or not ratios:
        raise PressParameterError("--press and --compression_ratio need at least one value each.")
    kwargs = dict(args.press_kwargs)
    every = "all" in names
    if every and kwargs:
        raise PressParameterError("--press_kwargs cannot be combined with --press all (each press has its own): "
                                  "drop --press_kwargs, or run one --press NAME with them.")
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
            cells.setdefault(key, Cell(key, _cell_params(args, name, ratio, skip, {} if name == "no_press" else None)))
    planned = list(cells.values())
    sweeping = every or len(planned) > 1
    if args.no_baseline or any(c.params["config"]["press"] == "no_press" for c in planned):
        return planned, [], sweeping
    baseline = Cell(cell_key("no_press", r="none"), _cell_params(args, "no_press", None, None, {}))
    return ([baseline, *planned], [], True) if sweeping else (planned, [baseline], False)


def run_cell(params: dict) -> dict:
    """The record of one (press, ratio) cell: model, data, settings, perplexity, speed, cache kept, environment."""
    args = PerplexityConfig(**params["config"], command=params.get("_command", ""),
                            no_progress=params.get("_no_progress", True), threads=params.get("_threads"))
    name = args.press
    mode = "ppl_apply_press" if args.ppl_apply_press else None
    skip = params.get("skip")
    if skip:
        status, _, reason = skip.partition(": ") if skip.startswith(("skipped: ", "unsupported: ")) else ("skipped", "", skip)
        press, ratio = None, None
        if status == "unsupported":  # it was built for the probe: show its setting
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NoCompressionWarning)
                press, ratio = build_press(name, args.compression_ratio, dict(args.press_kwargs), args.context_limit)
        return {"press": {"name": name, "compression_ratio": ratio, "setting": press_setting(name, press, ratio),
                          "params": press_params(press)},
                "mode": mode, "status": status, "error": reason, "data": {"dataset": args.dataset},
                "command": args.command}
    with warnings.catch_warnings():  # the command warned once when it planned the cells
        warnings.simplefilter("ignore", NoCompressionWarning)
        press, ratio = build_press(name, args.compression_ratio, dict(args.press_kwargs), args.context_limit)
    threads = set_threads(args.threads)
    load_start = results.machine_load()
    model, tokenizer, per_token = _cached_model(args)
    input_ids = ppl.tokenize(tokenizer, _cached_text(args), args.max_eval_tokens)
    torch.manual_seed(args.seed)
    record = {**_base_record(args, model, input_ids, input_device(model)),
              "press": {"name": name, "compression_ratio": ratio, "setting": press_setting(name, press, ratio),
                        "params": press_params(press)},
              "mode": mode}
    record["environment"].update(threads=threads, load_start=load_start)
    if not args.no_progress:
        print(f"[{name}] {record['press']['setting']}", file=sys.stderr)
    with hub.explain_press_failures(name):  # needs hub files offline: one line naming the fix
        record.update(evaluate_with_fallback(model, input_ids, press, args))
    record["kept"] = kept_summary(record, per_token)
    record["environment"]["load_end"] = results.machine_load()
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


def _probe_cells(args: PerplexityConfig, cells: list[Cell]) -> None:
    """``--press all``: try every press of the sweep in its mode before it starts (:func:`_check_sweep`, on this
    process's model) and record in each cell that cannot run there why, so the cell writes that instead."""
    model, tokenizer, _ = _cached_model(args)
    input_ids = ppl.tokenize(tokenizer, _cached_text(args), args.max_eval_tokens).to(input_device(model))
    several = len({c.params["config"]["compression_ratio"] for c in cells}) > 1
    jobs = []
    for cell in cells:
        config = cell.params["config"]
        press = ratio = None
        if not cell.params["skip"] and config["press"] != "no_press":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NoCompressionWarning)
                press, ratio = build_press(config["press"], config["compression_ratio"], dict(config["press_kwargs"]),
                                           args.context_limit)
        jobs.append((cell.key if several else config["press"], press, ratio, cell.params["skip"]))
    for cell, (_, _, _, skip) in zip(cells, _check_sweep(model, input_ids, jobs, args)):
        cell.params["skip"] = skip


def run(args: PerplexityConfig) -> list[dict]:
    """Run the evaluation described by ``args``; returns the records written (also printed: a table for one
    press, one line per cell and ``summary.md`` for a sweep)."""
    results.git_commit()  # the commit of the code this process imported, recorded in every cell it writes
    ratios = _as_list(args.compression_ratio)
    for ratio in ratios:
        check_ratio(ratio)
    for name in ("context_limit", "chunk_size", "decode_chunk_size", "segment", "num_runs", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise KVPressExtError(f"--{name} must be a positive integer, got {getattr(args, name)}.")
    if args.threads is not None and args.threads < 1:
        raise KVPressExtError(f"--threads must be a positive integer, got {args.threads}.")
    from kvpress_ext.evaluation.sweep import check_options, import_ray

    options = sweep_options(args)
    check_options(options)
    if args.executor == "ray":
        import_ray()
    # Check the presses and the input before loading anything heavy.
    cells, after, sweeping = plan_cells(args)
    _cached_text(args)
    check_output_dir(args.output_dir)
    threads = set_threads(args.threads)
    _check_model(args)
    inputs = input_digests(args, threads)
    if "all" in _as_list(args.press):
        _probe_cells(args, cells)
    for cell in cells + after:  # a sweep shows one bar over its cells, not each cell's own bars
        cell.params["_no_progress"] = args.no_progress or sweeping
        cell.params["inputs"] = inputs  # part of the cell key: an edited text or model is computed anew
    options.progress = options.progress and sweeping
    by_key: dict = {}

    def on_result(cell, cell_file, skipped):
        record = dict(cell_file["record"]) if cell_file["status"] == "ok" else _failed_record(args, cell_file)
        record["json_path"] = str(results.write_json(record, args.output_dir))
        by_key[cell.key] = record
        if sweeping:
            baseline = _baseline(list(by_key.values()))
            tqdm.write(format_line(record, baseline) + (" (done before)" if skipped else ""))  # above the bar

    for group in (cells, after):  # one press: its failure is the command's error, and nothing is written
        if group:
            run_sweep(group, run_cell, args.output_dir, options, desc="perplexity", on_result=on_result,
                      raise_failures=not sweeping)
    records = [by_key[c.key] for c in cells + after]
    if sweeping:
        md, png = results.write_summary(records, args.output_dir, command=args.command)
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
