"""Decode throughput and memory of presses at a given position and batch size, configs taking turns.

A config is ``full`` (no press) or ``NAME@TOKENS``: a registered press keeping ``TOKENS`` entries per sequence. A
press sized by a token budget gets it as its first budget parameter (R-KV's ``budget``, lazy streaming's
``cap_total``); a ratio-sized press compresses the prefill to ``TOKENS`` (its ratio set from the position) and then
runs inside kvpress's ``DecodingPress`` with that ``target_size`` (together, kvpress's ``PrefillDecodingPress``). Each run
prefills ``position`` tokens of real text per sequence through the press (equal lengths, no padding), decodes a
few untimed tokens, then is timed while decoding, in blocks that alternate between the configs so a change in a
shared machine's load hits them alike. Compression time is the time inside the press's compression step (R-KV's
``_compress``, lazy streaming's ``_compact``, the scorer's ``compress`` inside ``DecodingPress``).
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from kvpress_ext.core.apply import apply_press
from kvpress_ext.core.contract import budget_parameters, compression_phases, decoding_compressor
from kvpress_ext.core.errors import KVPressExtError
from kvpress_ext.core.registry import get_press, press_info
from kvpress_ext.evaluation.perplexity import cache_bytes
from kvpress_ext.evaluation.timing import compare, profile_call

MIB = 2**20
#: decoding steps profiled per config with ``profile`` (a whole block at batch 8 filled 24 GB of profiler events)
PROFILE_STEPS = 4


class ThroughputConfigError(KVPressExtError):
    """A config that is not ``full`` or ``NAME@TOKENS`` with a registered press and a positive budget."""


def build_config(config: str, interval: int, position: int = 0):
    """The press of ``config`` (None for ``full``) for sequences prefilled to ``position`` tokens; ``interval``:
    tokens between compressions while decoding."""
    if config == "full":
        return None
    name, sep, tokens = config.partition("@")
    if not sep or not tokens.isdigit() or int(tokens) < 1:
        raise ThroughputConfigError(f"Config {config!r}: write 'full' or NAME@TOKENS with a positive budget, e.g. "
                                    "rkv@512 (tokens kept per sequence).")
    budget = int(tokens)
    info = press_info(name)  # an unknown name lists the closest ones
    params = budget_parameters(info.cls)
    if name == "rkv":
        return get_press(name, budget=budget, compression_interval=interval)
    if name == "lazy_streaming":
        if budget <= interval + 5:
            raise ThroughputConfigError(f"Config {config!r}: lazy_streaming needs a budget above slack + 5 "
                                        f"({interval + 5}); raise it or lower --interval.")
        return get_press(name, cap_total=budget, slack=interval)
    if params:
        return get_press(name, **{params[0]: budget})
    decoding = get_press("decoding", base_press=name, target_size=budget, compression_interval=interval)
    if position <= budget:
        return decoding
    return get_press("prefill_decoding", prefilling_press=get_press(name, compression_ratio=1 - budget / position),
                     decoding_press=decoding)


def _compression_step(press):
    """(object, method name) of the press's compression step while decoding, for timing; None if none is known."""
    owner = decoding_compressor(press)
    for name in ("_compress", "_compact"):  # R-KV's and lazy streaming's own step
        if callable(getattr(owner, name, None)):
            return owner, name
    return (owner, "compress") if owner is not press else None


@dataclass
class Run:
    """One config at one position and batch: its cache, next tokens, and timings of the blocks it decoded."""

    config: str
    press: object
    batch: int
    position: int
    cache: DynamicCache = field(default_factory=DynamicCache)
    token: torch.Tensor | None = None
    blocks: list = field(default_factory=list)  # (tokens per sequence, seconds)
    compress_s: list = field(default_factory=lambda: [0.0])
    peak_kv: int = 0

    def __post_init__(self):
        step = _compression_step(self.press) if self.press is not None else None
        if step is not None:  # an instance attribute shadows the method the hook calls
            owner, name = step
            method = getattr(owner, name)

            @functools.wraps(method)
            def timed(*args, **kwargs):
                t = time.perf_counter()
                try:
                    return method(*args, **kwargs)
                finally:
                    self.compress_s[0] += time.perf_counter() - t

            setattr(owner, name, timed)

    def prefill(self, model, ids: torch.Tensor) -> None:
        prefill, _ = compression_phases(self.press)
        with torch.no_grad(), apply_press(self.press if prefill else None, model):
            out = model(input_ids=ids, past_key_values=self.cache, logits_to_keep=1)
        self.token = out.logits[:, -1:].argmax(-1)
        self.compress_s[0] = 0.0  # the prefill's compression is not decode time

    def decode(self, model, n: int, timed: bool = True) -> None:
        _, decoding = compression_phases(self.press)
        before = self.compress_s[0]
        with torch.no_grad(), apply_press(self.press if decoding else None, model):
            start = time.perf_counter()
            for _ in range(n):
                out = model(input_ids=self.token, past_key_values=self.cache, logits_to_keep=1)
                self.token = out.logits[:, -1:].argmax(-1)
                self.peak_kv = max(self.peak_kv, cache_bytes(self.cache))
            seconds = time.perf_counter() - start
        if timed:
            self.blocks.append((n, seconds))
        else:
            self.compress_s[0] = before

    def record(self) -> dict:
        tokens = sum(n for n, _ in self.blocks)
        seconds = sum(s for _, s in self.blocks)
        rates = [self.batch * n / s for n, s in self.blocks]
        return {
            "config": self.config, "position": self.position, "batch": self.batch, "tokens": tokens,
            "tok_s": self.batch * tokens / seconds, "tok_s_blocks_min": min(rates), "tok_s_blocks_max": max(rates),
            "tok_s_blocks_median": statistics.median(rates), "decode_s": seconds,
            "compression_share": self.compress_s[0] / seconds, "peak_kv_mib": self.peak_kv / MIB,
            "peak_kv_mib_per_sequence": self.peak_kv / MIB / self.batch,
        }


def time_runs(model, runs: list[Run], window: int, block: int, reference: str | None = None):
    """Decode ``window`` timed tokens per run in rounds of ``block`` through :func:`timing.compare` (interleaved,
    order alternating, spread, load, reliable flag); the runs are already prefilled and warmed up. A round of one
    compression interval holds one compression of every config, so rounds compare alike."""
    sizes = [min(block, window - done) for done in range(0, window, block)]
    turns = {run.config: iter(sizes) for run in runs}
    sides = {run.config: (lambda run=run: run.decode(model, next(turns[run.config]))) for run in runs}
    return compare(sides, reference or runs[0].config, repeat=len(sizes), warmup=0)


def run_interleaved(model, text_ids: list[int], configs: list[str], position: int, batch: int, window: int,
                    block: int, interval: int, warmup: int = 4, profile: int = 0) -> list[dict]:
    """Every config at ``position`` and ``batch``, decoding ``window`` timed tokens in turns of ``block``. Each record
    carries ``x_full`` (tok/s against ``full``) and ``timing``: :meth:`Comparison.record` against ``full`` (its
    ``speedup`` is the median per-round x_full), or against the first config when ``full`` is not run. ``profile``:
    after timing, ``PROFILE_STEPS`` more decoding steps of each config under torch's profiler, its top operators in
    ``profile`` (a step's split, not the compression's: that share is ``compression_share``)."""
    if len(text_ids) < position * batch:
        raise ThroughputConfigError(f"The text has {len(text_ids)} tokens, fewer than position x batch "
                                    f"({position} x {batch}): use a longer text or smaller sizes.")
    ids = torch.tensor([text_ids[i * position : (i + 1) * position] for i in range(batch)])
    runs = [Run(c, build_config(c, interval, position), batch, position) for c in configs]
    for run in runs:
        run.prefill(model, ids)
        run.decode(model, warmup, timed=False)
    reference = "full" if "full" in configs else configs[0]
    comparison = time_runs(model, runs, window, block, reference)
    records = [run.record() for run in runs]
    if profile:  # a few steps: the profiler keeps every event, and a batch's per-sequence hooks make many
        for run, r in zip(runs, records):
            r["profile"] = profile_call(lambda run=run: run.decode(model, PROFILE_STEPS, timed=False), profile)
    full = next((r for r in records if r["config"] == "full"), None)
    for r in records:
        r["x_full"] = r["tok_s"] / full["tok_s"] if full else None
        r["timing"] = comparison.record(r["config"]) if r["config"] != reference else {
            "reference": True, "threads": comparison.threads, "load_start": comparison.loads[0],
            "load_end": comparison.loads[-1], "reliable": comparison.reliable, "reasons": list(comparison.reasons)}
    return records


def largest_batch(kv_memory: int, peak_kv_mib_per_sequence: float) -> int:
    """Sequences whose peak KV fits in ``kv_memory`` bytes."""
    return int(kv_memory // (peak_kv_mib_per_sequence * MIB)) if peak_kv_mib_per_sequence > 0 else 0
