"""Peak memory of a prefill: the whole context in one pass, or in chunks compressed as they arrive.

Peak KV bytes: the cache's key/value bytes, read after every attention layer has appended its keys and before any
press compresses them (a hook registered ahead of the press's), the maximum over the prefill. A one-shot prefill
through a kvpress press compresses layer by layer, so its peak is the compressed earlier layers plus one full layer;
in chunks the cache holds at most the kept tokens plus one chunk in every layer. Peak process memory: the resident
set size sampled every few milliseconds during the prefill (weights included; the value before it is recorded too).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import torch
from transformers import DynamicCache

from kvpress_ext.core.adapters import get_adapter
from kvpress_ext.core.apply import apply_press
from kvpress_ext.core.chunked_prefill import check_prefill_chunk_size, press_for_chunks
from kvpress_ext.evaluation.perplexity import cache_bytes

_PAGE = 4096


def rss_bytes() -> int:
    """The process's resident set size now (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


@contextmanager
def rss_sampler(period_s: float = 0.005):
    """Sample the RSS in a thread while the block runs; yields a dict whose ``peak`` is the largest sample."""
    result = {"before": rss_bytes(), "peak": rss_bytes()}
    stop = threading.Event()

    def run():
        while not stop.is_set():
            result["peak"] = max(result["peak"], rss_bytes())
            stop.wait(period_s)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak"] = max(result["peak"], rss_bytes())


@contextmanager
def peak_kv(model, cache, record: dict):
    """Track ``record["peak_kv_bytes"]`` after each attention layer, before a press's hook (enter this first)."""
    def hook(module, args, kwargs, output):
        record["peak_kv_bytes"] = max(record.get("peak_kv_bytes", 0), cache_bytes(cache))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in get_adapter(model).attention_modules(model)]
    try:
        yield record
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def measure_prefill(model, input_ids: torch.Tensor, press=None, chunk: int | None = None) -> dict:
    """Prefill ``input_ids`` (1 x n) through ``press``, in one pass or in chunks of ``chunk`` tokens compressed after
    each one; peak KV bytes, final KV bytes, peak RSS and seconds."""
    n = int(input_ids.shape[1])
    check_prefill_chunk_size(chunk, n)
    cache = DynamicCache()
    record = {"tokens": n, "chunk": chunk, "peak_kv_bytes": 0}
    step = chunk or n
    t0 = time.perf_counter()
    with peak_kv(model, cache, record), apply_press(press_for_chunks(press, chunk), model), rss_sampler() as rss:
        for start in range(0, n, step):
            model(input_ids=input_ids[:, start : start + step], past_key_values=cache, logits_to_keep=1)
    record.update(seconds=time.perf_counter() - t0, final_kv_bytes=cache_bytes(cache),
                  final_cache_length=int(cache.get_seq_length()), rss_before_bytes=rss["before"],
                  peak_rss_bytes=rss["peak"])
    return record
