"""Sweep scaling: the same 8-cell perplexity sweep in-process (``--executor local``) and on a local Ray with 2
workers (``--executor ray --ray_num_cpus 2``), wall time of each measured in one run, and the records compared.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/sweep_scaling.py --out results/sweep_scaling.json

Cells: 4 presses x 2 ratios on stories260k (``--tokens`` of TinyStories, ``--ppl_apply_press`` in chunks of 128, no speed run),
one torch thread per cell in both modes, so the ray run has 2 cells in flight where the local one has 1. The ray
wall time includes starting Ray and its workers (each worker imports torch and loads the model once): that is
what a user waits for. Both sweeps must give the same numbers (timings aside); the script fails if they do not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import Counter
from datetime import date
from pathlib import Path

from kvpress_ext.cli.common import command_entry
from kvpress_ext.evaluation.runners.perplexity import PerplexityConfig, run
from kvpress_ext.storage.safe_write import write_output

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KVPRESS_EXT_SHARED", REPO.parent / "shared"))
PRESSES = ["knorm", "snapkv", "streaming_llm", "lazy_streaming"]
RATIOS = [0.25, 0.5]
TIMINGS = {"seconds", "json_path", "traceback", "load_start", "load_end"}  # a traceback names the process it ran in


def strip(x):
    if isinstance(x, dict):
        return {k: strip(v) for k, v in x.items() if k not in TIMINGS}
    if isinstance(x, list):
        return [strip(v) for v in x]
    return x


def sweep(executor: str, out: Path, tokens: int, workers: int) -> tuple[float, list[dict]]:
    config = PerplexityConfig(
        model=str(SHARED / "models" / "stories260k"), dataset="text",
        text_file=str(SHARED / "data" / "tinystories_val.txt"), max_eval_tokens=tokens, context_limit=512,
        chunk_size=128, press=PRESSES, compression_ratio=RATIOS, ppl_apply_press=True, no_speed=True, threads=1,
        output_dir=str(out), no_progress=True, no_baseline=True, executor=executor, ray_num_cpus=workers,
        command="sweep_scaling",
    )
    t0 = time.perf_counter()
    records = run(config)
    return time.perf_counter() - t0, records


def diff(a, b, path=""):
    """Paths where two JSON-like values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [p for k in sorted(set(a) | set(b)) for p in diff(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [p for i, (x, y) in enumerate(zip(a, b)) for p in diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [path or "."]


def per_worker(cells: list[dict]) -> dict:
    busy: dict = {}
    for c in cells:
        busy[c["pid"]] = busy.get(c["pid"], 0.0) + c["wall_s"]
    return busy


@command_entry("sweep_scaling")
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384, help="tokens per cell (sets the work per cell)")
    p.add_argument("--workers", type=int, default=2, help="CPUs of the local Ray (= cells in flight)")
    p.add_argument("--out", default=None, help="JSON file for the timings")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sweep_scaling_"))
    load_start = os.getloadavg()[0]
    try:
        local_s, local = sweep("local", tmp / "local", args.tokens, args.workers)
        ray_s, remote = sweep("ray", tmp / "ray", args.tokens, args.workers)
        cells = [json.loads(c.read_text()) for c in (tmp / "local" / "cells").glob("*.json")]
        ray_cells = [json.loads(c.read_text()) for c in (tmp / "ray" / "cells").glob("*.json")]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    differences = [f"{r['press']['name']}@{r['press']['compression_ratio']}: {path}"
                   for r, q in zip(local, remote) for path in diff(strip(r), strip(q))]
    failed = [r["press"]["name"] for r in local if r["status"] != "ok"]
    result = {
        "cells": len(local), "failed": failed, "tokens_per_cell": args.tokens, "ray_workers": args.workers,
        "local_wall_s": round(local_s, 2), "ray_wall_s": round(ray_s, 2), "ratio_ray_over_local": round(ray_s / local_s, 3),
        "sum_cell_s_local": round(sum(c["wall_s"] for c in cells), 2),
        "sum_cell_s_ray": round(sum(c["wall_s"] for c in ray_cells), 2),
        # CPU time the cells got per second of wall time: ~1 for one busy process, up to 2 for two on 2 free cores
        "cores_used_local": round(sum(c["cpu_s"] for c in cells) / local_s, 2),
        "cores_used_ray": round(sum(c["cpu_s"] for c in ray_cells) / ray_s, 2),
        # what Ray added beyond the busiest worker's cells: starting Ray and the workers (imports, model loads)
        "ray_overhead_s": round(ray_s - max(per_worker(ray_cells).values()), 2),
        "ray_cells_per_worker": sorted(Counter(c["pid"] for c in ray_cells).values()),
        "records_equal": not differences, "differences": differences[:20], "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_avg_1min": [round(load_start, 2), round(os.getloadavg()[0], 2)], "date": date.today().isoformat(),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_output(args.out, json.dumps(result, indent=2) + "\n", flag="--out")
    if differences:
        raise SystemExit("ray and local sweeps gave different records (see 'differences')")


if __name__ == "__main__":
    sys.exit(main())
