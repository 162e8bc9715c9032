"""The perplexity runner behind ``evaluation/perplexity.py``: one press next to the baseline, or a sweep over presses.

:class:`PerplexityConfig` holds every setting as plain values (the command line in
:mod:`kvpress_ext.cli.perplexity` builds one from its arguments); :func:`run` evaluates it. Bad input (unknown
press, missing file, ratio out of range, a parameter the press lacks, an unsupported model) raises
:class:`~kvpress_ext.core.errors.KVPressExtError`, which the command line prints on one line with exit status 2.

Every run is a set of cells, one per (press, ratio the press actually uses), run by :func:`run_cell` through
:mod:`kvpress_ext.evaluation.sweep` (``executor`` local or ray), each cell's JSON under ``output_dir/cells/``, resumable. A
cell loads the model through :mod:`kvpress_ext.evaluation.model_cache`, so a local run loads it once and each Ray worker once.

- One press: its cell, then the uncompressed baseline's (``no_press``, unless ``no_baseline``), printed as a table
  (:func:`kvpress_ext.evaluation.reports.perplexity_table.format_table`): perplexity and its change, what the press kept (its setting, the cache entries and bytes
  left against the same tokens uncompressed), decode speed and time to first token, with the thread count and how
  busy the machine was. A press that fails raises its error and writes nothing (the baseline runs after it).
- Several presses and/or ratios (a cross product) or ``all``: a sweep, the baseline first, one line per cell and
  ``summary.md``; a failing cell is recorded with its reason and the others go on. ``all`` first tries every press
  on a short piece of the text in the sweep's mode (in this process, on its model:
  :func:`kvpress_ext.evaluation.runners.perplexity_checks.mark_unsupported`) and lists those that cannot run there,
  with the reason, before the sweep starts; their cells record why. One press that compresses only one whole
  prefill gets the full-context perplexity (``whole_prefill_only``), and its record says why.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kvpress_ext.core.devices import input_device
from kvpress_ext.core.errors import KVPressExtError, NoCompressionWarning, PressParameterError
from kvpress_ext.core.registry import DEFAULT_COMPRESSION_RATIO
from kvpress_ext.evaluation import perplexity as ppl
from kvpress_ext.evaluation import results
from kvpress_ext.evaluation.model_cache import get_model, model_extra
from kvpress_ext.evaluation.press_setup import build_press, check_ratio, press_params, press_setting, sweep_jobs
from kvpress_ext.evaluation.reports.perplexity_table import (
    baseline_of,
    format_line,
    format_table,
    header_line,
    kept_summary,
)
from kvpress_ext.evaluation.runners.perplexity_checks import (
    check_context,
    check_model,
    mark_unsupported,
    whole_prefill_only,
)
from kvpress_ext.evaluation.speed import measure_speed
from kvpress_ext.evaluation.sweep import Cell, SweepOptions, cell_key, cell_path, check_options, import_ray, run_sweep
from kvpress_ext.runtime import hub
from kvpress_ext.runtime.models import DEFAULT_MODEL, resolve_model, retry_with_other_attention
from kvpress_ext.runtime.threads import set_threads
from kvpress_ext.storage.inputs import path_digest
from kvpress_ext.storage.safe_write import check_output_dir


@dataclass
class PerplexityConfig(SweepOptions):
    """Every setting of one perplexity/speed evaluation; the command-line options have the same names. How the
    cells of a sweep run (executor, retries, Ray resources) are the :class:`SweepOptions` fields it extends.

    The defaults run offline within 3 minutes on 2 CPU cores (first conversion of the model included):
    ``smollm2-135m`` on the first 1,024 tokens of a local text (the shared WikiText-2 test file, else Pride and
    Prejudice) in two 512-token windows, speed from one timed run (after a warm-up) of a 512-token prefill and 32
    decoded tokens; the hub data sets are used only when asked for (``--dataset wikitext`` / ``pg19``). A press
    sized by a token budget gets ``(1 - compression_ratio) * context_limit`` (256 tokens at the default 0.5).
    The perplexity run feeds the text in chunks under the press (``ppl_apply_press``), except for a press that can
    only compress one whole prefill (it gets the full-context perplexity, and the record says why);
    ``ppl_apply_press=False`` measures perplexity without the press (the press then acts in the speed and memory
    run only). Results go to ``results/perplexity/<model>`` unless ``output_dir`` is given.
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
    ppl_apply_press: bool = True
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
    output_dir: str | None = None  # default: results/perplexity/<model name>
    no_progress: bool = False
    no_baseline: bool = False
    command: str = field(default_factory=lambda: " ".join(shlex.quote(a) for a in sys.argv))

    @property
    def num_threads(self) -> int | None:
        """The former name of :attr:`threads`."""
        return self.threads


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


def evaluate_with_fallback(model, input_ids, press, args) -> dict:
    """:func:`evaluate_press`; a press that asserts on the attention implementation (some need eager attention
    weights, others refuse them) is retried once with the other one (eager <-> sdpa), and the record says so."""
    record, retry = retry_with_other_attention(model, lambda: evaluate_press(model, input_ids, press, args))
    if retry is not None:
        record["attn_implementation"] = retry.kernel
        record["note"] = f"retried with attn_implementation={retry.kernel}: {retry.reason}"
    return record


def _base_record(args, model, input_ids, device) -> dict:
    return {
        "model": {"name": args.model, "model_type": model.config.model_type, "dtype": str(model.dtype),
                  "attn_implementation": args.attn_implementation,
                  "num_parameters": sum(p.numel() for p in model.parameters()),
                  "device_map": getattr(model, "hf_device_map", None)},
        "data": {"dataset": args.dataset, "subset": args.subset if args.dataset == "wikitext" else None,
                 "split": args.split if args.dataset != "text" else None,
                 "sample_idx": args.sample_idx if args.dataset == "pg19" else None, "text_file": _text_file(args),
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


_SWEEP_FIELDS = tuple(f.name for f in dataclasses.fields(SweepOptions))  # how cells run, not what they measure
_CONTEXT_FIELDS = ("command", "output_dir", "no_progress", "no_baseline", "threads")  # do not change a cell's result
_TEXTS: dict = {}


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _load_options(args: PerplexityConfig) -> dict:
    return {"device": args.device, "dtype": args.dtype, "attn_implementation": args.attn_implementation,
            "device_map": args.device_map, "max_memory": args.max_memory, "offload_folder": args.offload_folder}


def _cached_model(args: PerplexityConfig):
    """(model, tokenizer, KV bytes per token) from :mod:`kvpress_ext.evaluation.model_cache`."""
    model, tokenizer = get_model(args.model, **_load_options(args))
    return model, tokenizer, model_extra(args.model, "kv_bytes_per_token", ppl.kv_bytes_per_token, **_load_options(args))


def _cached_text(args: PerplexityConfig) -> str:
    key = (args.dataset, args.subset, args.split, args.sample_idx, args.text_file)
    if key not in _TEXTS:
        _TEXTS[key] = ppl.load_text(*key)
    return _TEXTS[key]


def input_digests(args: PerplexityConfig, threads: int) -> dict:
    """What decides a cell's numbers beyond its settings: the model's files, the text's bytes, the threads (speed)."""
    return {"model": path_digest(resolve_model(args.model)),
            "text": path_digest(_text_file(args)) if _text_file(args) else None, "threads": threads}


def default_output_dir(model: str) -> str:
    """``results/perplexity/<model name>``: one folder per model, so runs on two models do not overwrite each other."""
    return str(Path("results") / "perplexity" / (Path(str(model)).name or "model"))


def _text_file(args: PerplexityConfig) -> str | None:
    """The text file read (the default one included), for the record and the table's header."""
    if args.dataset != "text":
        return None
    return str(args.text_file or ppl.default_text_file())


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
    if params.get("ppl_note"):
        record["perplexity"]["note"] = params["ppl_note"]
    record["environment"]["load_end"] = results.machine_load()
    return record


def _failed_record(args: PerplexityConfig, cell_file: dict) -> dict:
    config = cell_file["params"]["config"]
    return {"press": {"name": config["press"], "compression_ratio": config["compression_ratio"], "params": {}},
            "mode": "ppl_apply_press" if args.ppl_apply_press else None, "status": "failed",
            "error": cell_file["error"], "errors": cell_file["errors"], "traceback": cell_file.get("traceback"),
            "data": {"dataset": args.dataset}, "command": args.command}


def sweep_options(args: PerplexityConfig) -> SweepOptions:
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(SweepOptions)}
    return SweepOptions(**{**fields, "progress": fields["progress"] and not args.no_progress})


def run(args: PerplexityConfig) -> list[dict]:
    """Run the evaluation described by ``args``; returns the records written (also printed: a table for one
    press, one line per cell and ``summary.md`` for a sweep)."""
    results.git_commit()  # the commit of the code this process imported, recorded in every cell it writes
    if args.output_dir is None:
        args = dataclasses.replace(args, output_dir=default_output_dir(args.model))
    ratios = _as_list(args.compression_ratio)
    for ratio in ratios:
        check_ratio(ratio)
    for name in ("context_limit", "chunk_size", "decode_chunk_size", "segment", "num_runs", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise KVPressExtError(f"--{name} must be a positive integer, got {getattr(args, name)}.")
    if args.threads is not None and args.threads < 1:
        raise KVPressExtError(f"--threads must be a positive integer, got {args.threads}.")
    options = sweep_options(args)
    check_options(options)
    if args.executor == "ray":
        import_ray()
    # Check the presses and the input before loading anything heavy.
    cells, after, sweeping = plan_cells(args)
    _cached_text(args)
    check_output_dir(args.output_dir)
    check_context(args.model, args.context_limit, args.speed_context)
    threads = set_threads(args.threads)
    if args.executor == "local":  # loading it is the check, and the cells reuse it
        _cached_model(args)
    else:
        check_model(args.model)
    inputs = input_digests(args, threads)
    every = "all" in _as_list(args.press)
    if every or (not sweeping and args.executor == "local" and args.ppl_apply_press):
        model, tokenizer, _ = _cached_model(args)
        input_ids = ppl.tokenize(tokenizer, _cached_text(args), args.max_eval_tokens).to(input_device(model))
        (mark_unsupported if every else whole_prefill_only)(args, cells, model, input_ids)
    for cell in cells + after:  # a sweep shows one bar over its cells, not each cell's own bars
        cell.params["_no_progress"] = args.no_progress or sweeping
        cell.params["inputs"] = inputs  # part of the cell key: an edited text or model is computed anew
    options.progress = options.progress and sweeping
    by_key: dict = {}
    reused: dict = {}  # json path -> date measured, of the cells an earlier run computed
    waiting: list = []  # sweep lines that finished before the baseline (Ray): printed with it, with their change
    if sweeping:
        print(header_line(args, _text_file(args)))

    def on_result(cell, cell_file, skipped):
        record = dict(cell_file["record"]) if cell_file["status"] == "ok" else _failed_record(args, cell_file)
        record["setting"] = results.setting_digest(cell.params)  # its run file is this sweep's, never another's
        record["json_path"] = str(results.write_json(record, args.output_dir))
        if skipped:
            reused[record["json_path"]] = results.measured_date(cell_path(args.output_dir, cell.key, cell.params))
        by_key[cell.key] = record
        if sweeping:
            baseline = baseline_of(list(by_key.values()))
            waiting.append(record)
            if baseline is not None or not any(c.params["config"]["press"] == "no_press" for c in cells):
                for done in waiting:  # above the bar
                    tqdm.write(format_line(done, baseline, reused.get(done["json_path"])))
                waiting.clear()

    for group in (cells, after):  # one press: its failure is the command's error, and nothing is written
        if group:
            run_sweep(group, run_cell, args.output_dir, options, desc="perplexity", on_result=on_result,
                      raise_failures=not sweeping)
    records = [by_key[c.key] for c in cells + after]
    if sweeping:
        md, png = results.write_summary(records, args.output_dir, command=args.command)
        print(f"wrote {md}" + (f" and {png}" if png else "") + f", one JSON per cell in {args.output_dir}")
    else:
        print(format_table(records, header_line(args, _text_file(args)), reused))
    return records


