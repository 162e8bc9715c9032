"""One way to time a speed ratio: both sides in one process, interleaved, after a warm-up.

:func:`compare` runs every side once untimed (warm-up: lazy initialisation, allocator, caches), then ``repeat``
rounds in which every side runs once, the order alternating between rounds so a slow drift of the machine
weighs on every side alike. Each round gives one ratio per side against the reference side (the same moment of
the machine for both), so the reported ratio is the median of those per-round ratios, with their spread; the
median and best time of each side are reported too. Threads and the load average are recorded before, between
rounds and after.

The process's CPU seconds are recorded beside the wall seconds, and their ratio beside the wall ratio: on a
machine shared with other jobs the wall clock counts the time the process waited for a core, the CPU time does not
(with one torch thread and an idle machine the two agree). Time to first token is a wall-clock quantity; the CPU
ratio says what it would be without the wait, not what a user saw.

A ratio is marked ``reliable=False`` (with the reasons) when the per-round ratios spread by more than
``max_spread`` of their median, when a side's own times spread by more than ``max_spread`` of its median, or when
the 1-minute load average moved by more than ``max_load_change`` per CPU during the measurement: another process
started or stopped and the two sides did not see the same machine. A target is only "missed" on a reliable ratio.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kvpress_ext.core.devices import synchronize
from kvpress_ext.evaluation.results import machine_load

__all__ = ["Comparison", "SideTimes", "compare", "profile_call", "relative_spread"]


def relative_spread(values: list[float]) -> float:
    """(max - min) / median: 0 for identical values; nan for none."""
    if not values:
        return float("nan")
    mid = statistics.median(values)
    return (max(values) - min(values)) / mid if mid else float("inf")


@dataclass
class SideTimes:
    """Wall seconds of one side's timed runs (in round order)."""

    seconds: list[float]
    cpu_seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def spread(self) -> float:
        return relative_spread(self.seconds)

    def as_dict(self) -> dict:
        return {"median_s": self.median, "best_s": self.best, "spread": self.spread, "seconds": self.seconds,
                "cpu_seconds": self.cpu_seconds}


@dataclass
class Comparison:
    """What :func:`compare` measured; ``ratio[name]`` is the median per-round ratio of side ``name`` to the
    reference side."""

    reference: str
    sides: dict[str, SideTimes]
    ratios: dict[str, list[float]]  # per round, side / reference
    threads: int
    loads: list[dict]  # machine_load() before, after each round
    reliable: bool
    reasons: list[str]
    #: the value the last timed run of each side returned (e.g. a result carrying its own timings)
    results: dict[str, Any] = field(default_factory=dict, repr=False)

    def ratio(self, name: str) -> float:
        return statistics.median(self.ratios[name])

    def ratio_spread(self, name: str) -> float:
        return relative_spread(self.ratios[name])

    def ratio_of_best(self, name: str) -> float:
        return self.sides[name].best / self.sides[self.reference].best

    def cpu_ratios(self, name: str) -> list[float]:
        """Per round, CPU seconds of side ``name`` / CPU seconds of the reference."""
        return [a / b if b else float("nan")
                for a, b in zip(self.sides[name].cpu_seconds, self.sides[self.reference].cpu_seconds)]

    def between(self, name: str, other: str) -> dict:
        """Per round, seconds of side ``name`` / seconds of side ``other`` (a ratio between two sides that are not
        the reference, timed in the same rounds): median, spread and the per-round values."""
        values = [a / b for a, b in zip(self.sides[name].seconds, self.sides[other].seconds)]
        return {"median": statistics.median(values), "spread": relative_spread(values), "per_round": values}

    def flag(self) -> str:
        """``reliable`` or ``UNRELIABLE: <reasons>``: what a table prints next to a ratio."""
        return "reliable" if self.reliable else "UNRELIABLE: " + "; ".join(self.reasons)

    def record(self, name: str) -> dict:
        """Flat fields a benchmark puts in its record for side ``name``: the time ratio to the reference and its
        inverse (the speed-up, what "x faster" and tok/s ratios quote), both with their per-round spread, the
        CPU-time ratio, threads, load before and after, and the reliable flag with its reasons. One shape for every
        benchmark, so a reader (or a script) finds the flag in the same place."""
        speedups = [1 / r if r else float("inf") for r in self.ratios[name]]
        cpu = self.cpu_ratios(name)
        return {"ratio": self.ratio(name), "ratio_spread": self.ratio_spread(name),
                "ratio_of_best": self.ratio_of_best(name), "speedup": statistics.median(speedups),
                "speedup_spread": relative_spread(speedups), "cpu_ratio": statistics.median(cpu),
                "rounds": len(self.ratios[name]), "threads": self.threads, "load_start": self.loads[0],
                "load_end": self.loads[-1], "reliable": self.reliable, "reasons": list(self.reasons)}

    def as_dict(self) -> dict:
        return {
            "reference": self.reference,
            "sides": {k: v.as_dict() for k, v in self.sides.items()},
            "ratios": {k: {"median": self.ratio(k), "of_best": self.ratio_of_best(k), "spread": self.ratio_spread(k),
                           "per_round": v, "cpu_median": statistics.median(self.cpu_ratios(k)),
                           "cpu_spread": relative_spread(self.cpu_ratios(k)), "cpu_per_round": self.cpu_ratios(k)}
                       for k, v in self.ratios.items()},
            "threads": self.threads, "load_start": self.loads[0], "load_end": self.loads[-1],
            "load_1m_range": _load_range(self.loads), "reliable": self.reliable, "reasons": self.reasons,
        }

    def summary(self, name: str) -> str:
        """``0.231x (spread 4 %, best 0.228x; reliable)`` for side ``name``."""
        flag = self.flag()
        cpu = self.cpu_ratios(name)
        return (f"{self.ratio(name):.3f}x (per-round spread {100 * self.ratio_spread(name):.0f} %, of best "
                f"{self.ratio_of_best(name):.3f}x; CPU time {statistics.median(cpu):.3f}x, spread "
                f"{100 * relative_spread(cpu):.0f} %; {flag})")


def _load_range(loads: list[dict]) -> float | None:
    values = [x["loadavg_1m"] for x in loads if x.get("loadavg_1m") is not None]
    return max(values) - min(values) if values else None


def _timed(fn: Callable[[], Any], device) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of this process, result)."""
    synchronize(device)
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    synchronize(device)
    return time.perf_counter() - t, time.process_time() - c, out


def compare(sides: dict[str, Callable[[], Any]], reference: str, *, repeat: int = 3, warmup: int = 1,
            device="cpu", max_spread: float = 0.15, max_load_change: float = 0.5) -> Comparison:
    """Time every side ``repeat`` times, interleaved after ``warmup`` untimed runs each (see module docstring).

    ``sides`` maps names to zero-argument callables; ``reference`` names the side ratios are taken against (the
    full prefill, the uncompressed run). ``max_load_change`` is per CPU.
    """
    if reference not in sides:
        raise ValueError(f"reference {reference!r} is not one of the sides {list(sides)}")
    if repeat < 1 or warmup < 0:
        raise ValueError("compare needs repeat >= 1 and warmup >= 0")
    names = list(sides)
    loads = [machine_load()]
    for _ in range(warmup):
        for name in names:
            _timed(sides[name], device)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    results: dict[str, Any] = {}
    for r in range(repeat):
        for name in names if r % 2 == 0 else names[::-1]:
            seconds, cpu_seconds, results[name] = _timed(sides[name], device)
            times[name].append(seconds)
            cpu[name].append(cpu_seconds)
        loads.append(machine_load())
    ratios = {n: [a / b for a, b in zip(times[n], times[reference])] for n in names if n != reference}
    reasons = []
    for name, values in ratios.items():
        if repeat > 1 and relative_spread(values) > max_spread:
            reasons.append(f"{name}/{reference} ratios spread {100 * relative_spread(values):.0f} % "
                           f"> {100 * max_spread:.0f} %")
    for name, values in times.items():
        if repeat > 1 and relative_spread(values) > max_spread:
            reasons.append(f"{name} times spread {100 * relative_spread(values):.0f} % > {100 * max_spread:.0f} %")
    load_range, cpus = _load_range(loads), loads[0].get("cpu_count") or 1
    if load_range is None:
        reasons.append("load average unknown")
    elif load_range > max_load_change * cpus:
        reasons.append(f"load average moved by {load_range:.2f} (> {max_load_change * cpus:.2f} on {cpus} CPUs)")
    if repeat < 2:
        reasons.append("a single timed round has no spread")
    return Comparison(reference, {n: SideTimes(times[n], cpu[n]) for n in names}, ratios, torch.get_num_threads(), loads,
                      reliable=not reasons, reasons=reasons, results=results)


def profile_call(fn: Callable[[], Any], top: int) -> list[dict]:
    """One call of ``fn`` under torch's profiler: the ``top`` operators by self CPU time, the heaviest first, each
    with its share of the call. What a ratio that misses its target is explained with."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in events[:top]]
