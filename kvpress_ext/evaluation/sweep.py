"""Sweeps: many independent cells (press x ratio x data set x model), run in this process or as Ray tasks.

Why: a leaderboard is hundreds of cells of minutes to GPU-hours each that share nothing but a model. Ray schedules
them over the cores / GPUs / nodes it has (we write no scheduler); one JSON file per cell makes a sweep resumable,
fault-tolerant and summarisable while it runs. Every sweep in kvpress_ext goes through :func:`run_sweep`.

Use::

    from kvpress_ext.evaluation.sweep import Cell, SweepOptions, cell_key, load_cells, run_sweep

    cells = [Cell(cell_key("knorm", r=0.5), {"press": "knorm", "ratio": 0.5}), ...]
    result = run_sweep(cells, my_cell_fn, "results/my_sweep", SweepOptions(executor="ray", cell_gpus=1))
    result.records["knorm_r=0.5"]   # what my_cell_fn returned (cells that failed are in result.failed)
    load_cells("results/my_sweep")  # every cell file written so far, also while the sweep runs

Contract:

- ``Cell.key``: unique within the sweep and filesystem-safe (``[A-Za-z0-9._=+-]``; :func:`cell_key` builds one).
- ``Cell.params``: plain JSON values. Names that start with ``_`` are context (the command line, a progress flag):
  ``fn`` gets them, but they do not decide whether a finished cell is still valid.
- ``fn(params) -> dict``: a module-level function whose record depends only on ``params`` (so a Ray run gives the
  numbers of a local one); Ray ships it by reference, so its module must be importable on every worker (install
  kvpress-ext on every node). Heavy state such as a loaded model belongs in a per-process cache in ``fn``'s module:
  each process (this one locally, each Ray worker) then loads it once for all the cells it runs.
- ``out_dir`` must be new, empty or already ours (:mod:`kvpress_ext.storage.safe_write`); it is marked ours before any cell.
- Cell file ``<out_dir>/cells/<key>.<digest>.json``, written atomically by the driver: ``{"key", "status": "ok" |
  "failed", "params", "attempts", "errors", "error", "wall_s", "cpu_s", "executor", "host", "pid", "record"}``.
  ``digest`` (:func:`cell_digest`) hashes the params (``_`` names aside): the one cell key. So params must hold
  everything that changes the cell's numbers: settings, lengths, the model's and the data's fingerprints
  (:func:`kvpress_ext.storage.inputs.path_digest`), the thread count where it records timings. Two sweeps with
  other settings in one folder then write other files, never each other's.
- Resume: a cell whose file (same key, same digest) says ``ok`` with the same params is skipped; failed cells run
  again; a cell whose settings changed is computed anew, never mixed with the old number.
- Faults: an exception in ``fn``, or (Ray) a worker process that dies, is retried ``max_retries`` times; then the
  cell is recorded ``failed`` with the reason of each attempt and the other cells go on. Ctrl-C stops the sweep;
  the files written so far stay.
- Executors: ``local`` (default: one cell after another in this process) and ``ray`` (one task per cell with
  ``num_gpus=cell_gpus``, ``num_cpus=cell_cpus``) on the cluster at ``ray_address`` or ``RAY_ADDRESS``, else on a
  local Ray started for the sweep (``ray_num_cpus`` CPUs, all if None) and shut down after it. An already
  initialised Ray session (``ray.init`` called by the caller) is used as it is and left running.
- Ray is the optional extra ``kvpress-ext[distributed]``, imported only for ``executor="ray"``; without it
  :class:`MissingExtraError` (a one-line ``KVPressExtError``) names the extra.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kvpress_ext.core.errors import KVPressExtError
from kvpress_ext.storage.inputs import load_json
from kvpress_ext.storage.safe_write import (
    atomic_write_bytes,
    check_output_dir,
    check_own_subdir,
    claim_output_dir,
    json_safe,
    own_subdir,
)

EXECUTORS = ("local", "ray")
CELLS_DIR = "cells"
_KEY_RE = re.compile(r"^[A-Za-z0-9._=+-]{1,200}$")


class SweepError(KVPressExtError):
    """A sweep that cannot start: bad options, duplicate or unsafe keys."""


class MissingExtraError(KVPressExtError):
    """An optional dependency that is not installed; the message names the extra that brings it."""


@dataclass(frozen=True)
class Cell:
    """One unit of a sweep: a key (its file name) and the plain parameters ``fn`` gets."""

    key: str
    params: dict


@dataclass
class SweepOptions:
    """How to run a sweep (the command-line flags of the same names: ``kvpress_ext.cli.common.add_sweep_args``)."""

    executor: str = "local"
    max_retries: int = 1
    cell_gpus: float = 0.0
    cell_cpus: float = 1.0
    ray_address: str | None = None
    ray_num_cpus: int | None = None
    progress: bool = True


@dataclass
class SweepResult:
    """Cell files of the sweep by key (``cells``), the records of the cells that succeeded (``records``), the keys
    that failed (``failed``), and those skipped because an earlier run had finished them (``skipped``)."""

    cells: dict = field(default_factory=dict)
    records: dict = field(default_factory=dict)
    failed: list = field(default_factory=list)
    skipped: list = field(default_factory=list)


def cell_key(*parts, **named) -> str:
    """A filesystem-safe key from values and ``name=value`` pairs: ``cell_key("knorm", r=0.5) == "knorm_r=0.5"``."""
    items = [str(p) for p in parts] + [f"{k}={v}" for k, v in named.items()]
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", "_".join(items)).strip("-")[:200]


def import_ray():
    """The ``ray`` module, or a one-line error naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise MissingExtraError(
            '--executor ray needs Ray: pip install "kvpress-ext[distributed]" (or run with --executor local).'
        ) from None
    return ray


def check_options(options: SweepOptions) -> None:
    if options.executor not in EXECUTORS:
        raise SweepError(f"--executor must be one of {', '.join(EXECUTORS)}, got {options.executor!r}.")
    if options.max_retries < 0:
        raise SweepError(f"--max_retries must be >= 0, got {options.max_retries}.")
    if options.cell_cpus < 0 or options.cell_gpus < 0 or options.cell_cpus + options.cell_gpus <= 0:
        raise SweepError("--cell_cpus and --cell_gpus must be >= 0 and not both 0.")
    if options.ray_num_cpus is not None and options.ray_num_cpus < 1:
        raise SweepError(f"--ray_num_cpus must be >= 1, got {options.ray_num_cpus}.")


def _check_cells(cells: list[Cell]) -> None:
    seen = set()
    for cell in cells:
        if not _KEY_RE.match(cell.key):
            raise SweepError(f"Cell key {cell.key!r} is not filesystem-safe: use letters, digits and ._=+- (cell_key).")
        if cell.key in seen:
            raise SweepError(f"Two cells have the key {cell.key!r}; each cell needs its own.")
        seen.add(cell.key)


def cell_identity(params: dict) -> dict:
    """What makes two cells the same computation: their params without the ``_``-prefixed (bookkeeping) ones,
    as plain JSON values. A finished cell is reused only when this matches."""
    return json_safe({k: v for k, v in params.items() if not str(k).startswith("_")})


def cell_digest(params: dict) -> str:
    """12 hex digits of :func:`cell_identity`: two cells share a file only when everything that decides their
    numbers is equal."""
    text = json.dumps(cell_identity(params), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def write_json_atomic(path: Path, data) -> None:
    """Write ``data`` as JSON so that a reader sees the old file or the new one, never half of one
    (:func:`kvpress_ext.storage.safe_write.atomic_write_bytes`: a temporary sibling, fsynced, renamed into place).
    The folder it goes into must be a real folder, not a symbolic link (:func:`~kvpress_ext.storage.safe_write.own_subdir`)."""
    own_subdir(path.parent.parent, path.parent.name)
    atomic_write_bytes(path, (json.dumps(json_safe(data), indent=2) + "\n").encode())


def cell_path(out_dir, key: str, params: dict) -> Path:
    """Where the cell of ``key`` with ``params`` is kept: ``<out_dir>/cells/<key>.<cell_digest(params)>.json``."""
    return Path(out_dir) / CELLS_DIR / f"{key}.{cell_digest(params)}.json"


def _read_cell(path: Path) -> dict | None:
    try:
        data = load_json(path.read_bytes(), f"cell file {path}")
    except (OSError, ValueError):  # unreadable, not JSON, beyond the reader's bounds: not a finished cell
        return None
    return data if isinstance(data, dict) else None


def load_cells(out_dir) -> list[dict]:
    """Every cell file under ``out_dir/cells`` (sorted by key); usable while a sweep is still writing them."""
    cells = Path(out_dir) / CELLS_DIR
    if cells.is_symlink():
        return []
    return [d for path in sorted(cells.glob("*.json")) if (d := _read_cell(path)) is not None]


def recorded_cell(out_dir, cell: Cell) -> dict | None:
    """The file an earlier run wrote for exactly ``cell`` (same key and identity), finished or failed; None when
    there is none (or it is unreadable, or ``cells/`` is a link). Runners use it to tell a reused cell from one to
    run before calling :func:`run_sweep`."""
    path = cell_path(out_dir, cell.key, cell.params)
    if path.parent.is_symlink():
        return None
    data = _read_cell(path)
    if data is not None and cell_identity(data.get("params") or {}) == cell_identity(cell.params):
        return data
    return None


def _finished(out_dir, cell: Cell) -> dict | None:
    data = recorded_cell(out_dir, cell)
    return data if data is not None and data.get("status") == "ok" else None


def _reason(exc: BaseException) -> str:
    """One line: the exception type and the first line of its message (a Ray task error: the user's exception)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    text = str(exc).strip()
    first = text.splitlines()[0][:300] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _call(fn: Callable, params: dict) -> dict:
    """What runs for a cell (in this process or a Ray worker): ``fn`` timed, with where it ran."""
    t0, c0 = time.perf_counter(), time.process_time()
    record = fn(params)
    return {"record": record, "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
            "host": socket.gethostname(), "pid": os.getpid()}


class _Tracker:
    """Writes cell files, counts failures, drives the progress bar and the caller's callback."""

    def __init__(self, out_dir, options, total, skipped, desc, on_result, flag="--output_dir", raise_failures=False):
        from tqdm.auto import tqdm

        self.out_dir, self.options, self.on_result = out_dir, options, on_result
        self.flag, self.raise_failures, self.claimed = flag, raise_failures, False
        self.result = SweepResult()
        self.bar = tqdm(total=total, initial=skipped, desc=desc, unit="cell", disable=not options.progress)
        self.bar.set_postfix(failed=0)

    def finish(self, cell: Cell, attempts: int, errors: list[str], output: dict | None, tb: str | None = None):
        ok = output is not None
        data = {
            "key": cell.key, "status": "ok" if ok else "failed", "params": cell.params, "attempts": attempts,
            "errors": errors, "error": None if ok else errors[-1], "executor": self.options.executor,
            "wall_s": output["wall_s"] if ok else None, "host": output["host"] if ok else None,
            "pid": output["pid"] if ok else None, "cpu_s": output["cpu_s"] if ok else None,
            "record": output["record"] if ok else None,
        }
        if tb and not ok:
            data["traceback"] = tb[-3000:]
        if not self.claimed:  # checked before the sweep; marked ours only once something is written
            claim_output_dir(self.out_dir, self.flag)
            own_subdir(self.out_dir, CELLS_DIR, self.flag)
            self.claimed = True
        write_json_atomic(cell_path(self.out_dir, cell.key, cell.params), data)
        self.add(cell, data)
        self.bar.update(1)
        self.bar.set_postfix(failed=len(self.result.failed))

    def add(self, cell: Cell, data: dict, skipped: bool = False):
        self.result.cells[cell.key] = data
        if data["status"] == "ok":
            self.result.records[cell.key] = data["record"]
        else:
            self.result.failed.append(cell.key)
        if skipped:
            self.result.skipped.append(cell.key)
        if self.on_result is not None:
            self.on_result(cell, data, skipped)


def run_sweep(cells: list[Cell], fn: Callable[[dict], dict], out_dir, options: SweepOptions | None = None, *,
              desc: str = "sweep", on_result: Callable | None = None, flag: str = "--output_dir",
              raise_failures: bool = False) -> SweepResult:
    """Run every cell not finished yet in ``out_dir`` with ``fn`` on the chosen executor (see the module doc).

    ``out_dir`` is checked first and claimed before the first cell file is written
    (:func:`kvpress_ext.storage.safe_write.claim_output_dir`; ``flag`` names it in the one-line refusal of a directory that
    is not ours). ``on_result(cell, cell_file_dict, skipped)`` is called in this process as each cell is skipped
    or finishes (for printing a line or writing another file). With ``raise_failures``, a cell that still fails
    after its retries raises its own exception (a Ray task's: the cell's) and writes no cell file: the caller
    runs one cell whose failure is the command's error. Returns a :class:`SweepResult`.
    """
    options = options or SweepOptions()
    check_options(options)
    _check_cells(cells)
    ray = import_ray() if options.executor == "ray" else None  # missing extra: fail before any work
    check_output_dir(out_dir, flag)
    check_own_subdir(out_dir, CELLS_DIR, flag)
    done = {c.key: d for c in cells if (d := _finished(out_dir, c)) is not None}
    todo = [c for c in cells if c.key not in done]
    tracker = _Tracker(out_dir, options, len(cells), len(done), desc, on_result, flag, raise_failures)
    for cell in cells:
        if cell.key in done:
            tracker.add(cell, done[cell.key], skipped=True)
    try:
        if todo:
            if ray is None:
                _run_local(todo, fn, options, tracker)
            else:
                _run_ray(ray, todo, fn, options, tracker)
    finally:
        tracker.bar.close()
    order = {c.key: i for i, c in enumerate(cells)}
    tracker.result.cells = dict(sorted(tracker.result.cells.items(), key=lambda kv: order[kv[0]]))
    tracker.result.records = {k: tracker.result.records[k] for k in tracker.result.cells if k in tracker.result.records}
    return tracker.result


def _run_local(todo: list[Cell], fn, options: SweepOptions, tracker: _Tracker) -> None:
    for cell in todo:
        errors: list[str] = []
        for attempt in range(1, options.max_retries + 2):
            try:
                output = _call(fn, cell.params)
            except Exception as exc:  # any failure of one cell is recorded (or raised), the sweep goes on
                errors.append(_reason(exc))
                if attempt > options.max_retries:
                    if tracker.raise_failures:
                        raise
                    tracker.finish(cell, attempt, errors, None, traceback.format_exc(limit=6))
            else:
                tracker.finish(cell, attempt, errors, output)
                break


def _init_ray(ray, options: SweepOptions) -> bool:
    """Connect to (or start) Ray unless a session is already open; True if this call opened it."""
    if ray.is_initialized():
        return False
    import logging

    address = options.ray_address or os.environ.get("RAY_ADDRESS")
    common = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address:
        ray.init(address=address, **common)
    else:
        ray.init(address="local", num_cpus=options.ray_num_cpus, include_dashboard=False, **common)
    return True


def _run_ray(ray, todo: list[Cell], fn, options: SweepOptions, tracker: _Tracker) -> None:
    # Retries are ours (max_retries=0 for Ray) so that every attempt's reason is recorded the same way as locally.
    task = ray.remote(_call).options(num_cpus=options.cell_cpus, num_gpus=options.cell_gpus, max_retries=0,
                                     retry_exceptions=False)
    opened = _init_ray(ray, options)
    pending: dict = {}
    try:
        fn_ref = ray.put(fn)
        for cell in todo:
            pending[task.remote(fn_ref, cell.params)] = (cell, 1, [])
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            cell, attempt, errors = pending.pop(ref)
            try:
                output = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - a task error or a dead worker: retry or record
                errors = [*errors, _reason(exc)]
                if attempt > options.max_retries:
                    if tracker.raise_failures:
                        cause = getattr(exc, "cause", None)  # a RayTaskError wraps the cell's own exception
                        raise (cause if isinstance(cause, Exception) else exc) from None
                    tracker.finish(cell, attempt, errors, None, str(exc))
                else:
                    pending[task.remote(fn_ref, cell.params)] = (cell, attempt + 1, errors)
            else:
                tracker.finish(cell, attempt, errors, output)
    finally:
        for ref in pending:  # interrupted: stop what is still queued or running
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001, S110 - best effort while shutting down
                pass
        if opened:
            ray.shutdown()
