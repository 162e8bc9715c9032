"""The long-generation runner behind ``evaluation/long_generation.py``: every decode-time method at every budget
against the full cache, as cells run through :func:`kvpress_ext.evaluation.sweep.run_sweep`.

Each part (``nll``: teacher-forced NLL of a long continuation; ``gen``: greedy generation) is one sweep into
``output_dir/<part>/cells/``, one cell per (method, budget) measured by :mod:`kvpress_ext.evaluation.long_generation`
on the model of :mod:`kvpress_ext.evaluation.model_cache`. A cell is reused when every setting that produced it
matches; after each cell the part's summary JSON and plot are rewritten, so a run stopped by ``max_seconds`` (no cell
starts after it) keeps what it finished, and the same command continues it.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvpress_ext.evaluation.long_generation import (
    DEFAULT_GEN_PROMPT,
    METHODS,
    LongGenerationInputError,
    agreement,
    build_press,
    cells,
    chat_prompt_ids,
    check_budgets,
    generation_cell,
    nll_cell,
)
from kvpress_ext.evaluation.model_cache import get_model
from kvpress_ext.evaluation.perplexity import tokenize
from kvpress_ext.evaluation.reports.long_generation import (
    GEN_COLUMNS,
    NLL_COLUMNS,
    generation_table,
    nll_table,
    plot_cache,
    plot_nll,
)
from kvpress_ext.evaluation.results import machine_load, measured_date
from kvpress_ext.evaluation.sweep import Cell, SweepOptions, cell_path, recorded_cell, run_sweep
from kvpress_ext.runtime.threads import set_threads
from kvpress_ext.storage.inputs import read_text_file, shared_dir
from kvpress_ext.storage.safe_write import claim_output_dir, write_output

#: the tiny setting of ``--quick`` (options given explicitly win): under a minute on the default model, 2 CPU cores
QUICK = {"context": 64, "continuation": 128, "budgets": [48, 96], "gen_tokens": 48, "compression_interval": 16,
         "decode_chunk_size": 8}


@dataclass
class LongGenerationConfig:
    """Every setting of one long-generation run; the command-line options have the same names."""

    model: str
    device: str | None = None
    dtype: str = "float32"
    part: str = "both"
    methods: list = field(default_factory=lambda: list(METHODS))
    budgets: list = field(default_factory=lambda: [256, 512, 1024])
    compression_interval: int = 128
    text_file: str | None = None
    context: int = 512
    continuation: int = 2048
    decode_chunk_size: int = 1
    segment: int = 256
    gen_tokens: int = 1000
    prompt: str = DEFAULT_GEN_PROMPT
    use_chat_template: bool = True
    target_budget: int = 512
    output_dir: str = "results/long_generation"
    max_seconds: float | None = None
    progress: bool = True
    threads: int | None = None
    command: str = ""


_IDS: dict = {}


def _text_ids(params: dict, tokenizer) -> torch.Tensor:
    key = (params["_text_path"], params["model"], params["context"] + params["continuation"])
    if key not in _IDS:
        _IDS.clear()
        _IDS[key] = tokenize(tokenizer, read_text_file(params["_text_path"], "--text_file"), max_tokens=key[2])
    return _IDS[key]


def run_cell(params: dict) -> dict:
    """One (method, budget) cell of part ``params["part"]``; its record repeats the settings that produced it."""
    torch.set_grad_enabled(False)
    model, tokenizer = get_model(params["model"], device=params.get("_device"), dtype=params["dtype"])
    device = next(model.parameters()).device
    press = build_press(params["method"], params["budget"], params["compression_interval"])
    if params["part"] == "nll":
        result = nll_cell(model, _text_ids(params, tokenizer).to(device), params["context"], press,
                          params["decode_chunk_size"], params["segment"])
    else:
        prompt = chat_prompt_ids(tokenizer, params["prompt"], params["chat_template"]).to(device)
        result = generation_cell(model, prompt, press, params["gen_tokens"])
    settings = {k: v for k, v in params.items() if k not in ("part", "method", "budget", "segment")
                and not k.startswith("_")}
    return {"method": params["method"], "budget": params["budget"], "settings": settings, **result}


@dataclass
class _Part:
    """One part of the run (``nll`` or ``gen``): its cell settings and how it reports. After each cell,
    ``summarize(records, reused)`` gives the table and the summary's extra fields, and ``plot(records, path)``
    draws ``<plot_name>``; the part's summary is ``<name>_summary.json``."""

    name: str
    settings: dict
    summarize: Callable[[list, dict], tuple[str, dict]]
    plot: Callable[[list, Path], None]
    plot_name: str
    columns: str


def _run_part(part: _Part, config: LongGenerationConfig, out: Path, summary: dict, say, deadline: float) -> list:
    """Run (or reuse) every cell of ``part``, rewriting its summary and plot after each; no cell starts after
    ``deadline`` (a ``time.monotonic()`` value). Prints the part's table and returns the files it wrote."""
    grid = cells(config.methods, config.budgets, config.target_budget)
    folder = out / part.name
    sweep = [Cell(c.name, {"part": part.name, "method": c.method, "budget": c.budget, **part.settings})
             for c in grid]
    shown = {k: v for k, v in part.settings.items() if not k.startswith("_")}
    records, reused, table = [], {}, None
    for i, cell in enumerate(sweep):
        if (recorded_cell(folder, cell) or {}).get("status") != "ok" and time.monotonic() > deadline:
            say(f"{part.name}: --max_seconds reached; {len(sweep) - i} cell(s) not run (run the same command "
                "again to continue)")
            break
        result = run_sweep([cell], run_cell, folder, SweepOptions(max_retries=0, progress=False),
                           raise_failures=True)
        if cell.key in result.skipped:
            path = cell_path(folder, cell.key, cell.params)
            reused[cell.key] = measured_date(path)
            say(f"{part.name} {cell.key}: reused {path} (measured {reused[cell.key]})")
        else:
            say(f"{part.name} {cell.key}: done in {result.records[cell.key]['seconds']:.1f}s")
        records.append(result.records[cell.key])
        table, extra = part.summarize(records, reused)
        write_output(out / f"{part.name}_summary.json",
                     json.dumps({**summary, "settings": shown, **extra, "records": records}, indent=1))
        part.plot(records, out / part.plot_name)
    if table is None:
        print(f"{part.name}: no cell finished")
        return []
    print(table)
    print(part.columns)
    return [out / f"{part.name}_summary.json", out / part.plot_name]


def run(config: LongGenerationConfig) -> int:
    """Run the parts of ``config``; prints each part's table, what its columns mean and where it wrote."""
    set_threads(config.threads)
    torch.set_grad_enabled(False)

    def say(text):
        if config.progress:
            print(text, flush=True)

    check_budgets(config.budgets)
    cells(config.methods, config.budgets)  # unknown methods: one line before anything is loaded
    text_file = Path(config.text_file) if config.text_file else shared_dir() / "data" / "pride_and_prejudice.txt"
    if config.part in ("nll", "both") and not text_file.is_file():
        raise LongGenerationInputError(f"--text_file {text_file} does not exist; pass an existing UTF-8 text file.")
    out = claim_output_dir(config.output_dir)
    model, tokenizer = get_model(config.model, device=config.device, dtype=config.dtype)
    device = next(model.parameters()).device
    deadline = time.monotonic() + (config.max_seconds if config.max_seconds is not None else math.inf)
    common = {"model": config.model, "dtype": config.dtype, "compression_interval": config.compression_interval,
              "_device": config.device}
    summary = {"model": config.model, "device": str(device), "dtype": config.dtype,
               "command": config.command or " ".join(sys.argv), "machine_load_start": machine_load()}
    wrote = []
    if config.part in ("nll", "both"):
        n = config.context + config.continuation
        ids = tokenize(tokenizer, read_text_file(text_file, "--text_file"), max_tokens=n)
        if ids.shape[1] < n:
            raise LongGenerationInputError(f"--text_file {text_file} has {ids.shape[1]} tokens; --context + "
                                           f"--continuation needs {n}. Pass a longer text or smaller values.")

        def nll_summary(records, reused):
            table, target = nll_table(records, config.target_budget, reused=reused)
            return table, {"target": target}

        nll_title = f"{config.model}: NLL of {config.continuation} continuation tokens after {config.context} " \
                    f"({text_file.name})"
        wrote += _run_part(_Part(
            "nll", {**common, "text_file": text_file.name, "context": config.context,
                    "continuation": config.continuation, "decode_chunk_size": config.decode_chunk_size,
                    "segment": config.segment, "_text_path": str(text_file)},
            nll_summary, lambda records, path: plot_nll(records, path, nll_title), "nll.png", NLL_COLUMNS),
            config, out, summary, say, deadline)
    if config.part in ("gen", "both"):
        start = []

        def gen_summary(records, reused):
            full = next((r for r in records if r["method"] == "full"), None)
            for r in records:
                r.update(agreement(r["generated_ids"], full["generated_ids"]) if full else {})
            start[:] = [tokenizer.decode(full["generated_ids"][:60])] if full else []
            return generation_table(records, reused), {}

        gen_title = f"{config.model}: cache length while generating {config.gen_tokens} tokens greedily"
        wrote += _run_part(_Part(
            "gen", {**common, "prompt": config.prompt, "chat_template": config.use_chat_template,
                    "gen_tokens": config.gen_tokens},
            gen_summary, lambda records, path: plot_cache(records, path, gen_title), "gen_cache.png", GEN_COLUMNS),
            config, out, summary, say, deadline)
        if start:
            print("full-cache generation starts:", repr(start[0]))
    if wrote:
        print(f"wrote {', '.join(map(str, wrote))} and one JSON per cell in {out}/<part>/cells")
    return 0
