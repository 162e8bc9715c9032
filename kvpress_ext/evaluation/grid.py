"""A grid of independent cells, each run by a pure function and saved as one JSON file.

A cell is a unique ``key`` and plain ``params`` (JSON values only); ``run_cell(params) -> record`` does all the
work. :func:`run_cells` is the whole executor: it skips cells whose JSON already exists (so a grid resumes where
it stopped), records a cell that raises as ``status: failed`` with the reason and goes on with the rest. It is
one small function on purpose, so a parallel executor (local processes, ray) can replace it.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Cell:
    key: str
    params: dict


def cell_path(out_dir, key: str) -> Path:
    return Path(out_dir) / "cells" / (re.sub(r"[^A-Za-z0-9_.+=-]", "_", key) + ".json")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}".rstrip(": ")


def run_cells(cells: Iterable[Cell], run_cell: Callable[[dict], dict], out_dir, retry_failed: bool = False,
              progress: bool = True, compute: bool = True) -> list[dict]:
    """Run every cell not already on disk; returns all records (old and new) in cell order.
    ``compute=False`` only collects the cells already on disk (to rebuild summaries)."""
    cells = list(cells)
    keys = [c.key for c in cells]
    if len(set(keys)) != len(keys):
        raise ValueError("cell keys must be unique")
    records, done = [], 0
    for i, cell in enumerate(cells):
        path = cell_path(out_dir, cell.key)
        if path.is_file():
            record = json.loads(path.read_text())
            if record.get("status") == "ok" or not retry_failed:
                records.append(record)
                continue
        if not compute:
            continue
        t0 = time.perf_counter()
        try:
            result = {"status": "ok", **run_cell(cell.params)}
        except Exception as exc:  # noqa: BLE001 - one bad cell must not stop the grid
            result = {"status": "failed", "error": _first_line(exc)}
        record = {"key": cell.key, **cell.params, **result, "cell_seconds": time.perf_counter() - t0}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)
        records.append(record)
        done += 1
        if progress:
            status = record["status"] if record["status"] == "ok" else f"FAILED ({record['error']})"
            print(f"[{i + 1}/{len(cells)}] {cell.key}: {status} score={record.get('score')} "
                  f"{record['cell_seconds']:.1f}s", file=sys.stderr)
    if progress:
        print(f"{done} cells computed, {len(cells) - done} reused", file=sys.stderr)
    return records
