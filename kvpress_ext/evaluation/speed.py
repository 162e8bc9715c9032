"""Prefill time, decode throughput and memory of a press: warm up once, then the median of several runs.

The prefill runs the context in one forward pass inside ``apply_press`` (if the press compresses at prefill);
decoding is greedy, one token per forward, inside ``apply_press`` if the press compresses while decoding, with EOS
suppressed until ``min_new_tokens`` tokens exist. Positions come from the cache. Devices are synchronised around
every timed region.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from kvpress_ext.core.apply import apply_press
from kvpress_ext.core.contract import compression_phases
from kvpress_ext.core.devices import input_device, synchronize
from kvpress_ext.core.positions import cache_length
from kvpress_ext.core.tokens import eos_token_ids
from kvpress_ext.evaluation.perplexity import cache_bytes


def reset_peak_memory(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device) -> dict:
    """CUDA: max allocated since the last reset. CPU: the process's peak resident set size (never reset)."""
    if torch.device(device).type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)), "peak_memory_kind": "cuda_max_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_memory_bytes": int(rss if sys.platform == "darwin" else rss * 1024), "peak_memory_kind": "cpu_peak_rss"}


@torch.no_grad()
def _one_run(model, context: torch.Tensor, press, max_new_tokens: int, min_new_tokens: int) -> dict:
    device = context.device
    prefill_phase, decoding_phase = compression_phases(press)
    eos = eos_token_ids(model)
    cache = DynamicCache()
    synchronize(device)
    t0 = time.perf_counter()
    with apply_press(press if prefill_phase else None, model):
        logits = model(input_ids=context, past_key_values=cache, logits_to_keep=1).logits
        token = int(logits[0, -1].argmax())
    synchronize(device)
    ttft = time.perf_counter() - t0
    bytes_prefill, len_prefill = cache_bytes(cache), cache_length(cache)
    generated = [token]
    synchronize(device)
    t1 = time.perf_counter()
    with apply_press(press if decoding_phase else None, model):
        while len(generated) < max_new_tokens:
            if generated[-1] in eos and len(generated) >= min_new_tokens:
                break
            ids = torch.tensor([[generated[-1]]], device=device)
            logits = model(input_ids=ids, past_key_values=cache, logits_to_keep=1).logits[0, -1]
            if len(generated) + 1 < min_new_tokens and eos:
                logits = logits.clone()
                logits[list(eos)] = float("-inf")
            generated.append(int(logits.argmax()))
    synchronize(device)
    decode = time.perf_counter() - t1
    steps = len(generated) - 1  # tokens produced by decode forwards (the first came from the prefill)
    return {
        "ttft_s": ttft, "decode_s": decode, "new_tokens": len(generated), "decode_steps": steps,
        "decode_tok_per_s": steps / decode if decode > 0 and steps else float("nan"),
        "cache_bytes_after_prefill": bytes_prefill, "cache_len_after_prefill": len_prefill,
        "cache_bytes_end": cache_bytes(cache), "cache_len_end": cache_length(cache),
    }


def measure_speed(model, context: torch.Tensor, press=None, max_new_tokens: int = 200, min_new_tokens: int = 0,
                  num_runs: int = 3, decode_only: bool = False, progress: bool = False) -> dict:
    """Median TTFT (prefill + first token) and decode tok/s over ``num_runs`` runs after one warm-up run.

    ``decode_only``: report only decode throughput (the prefill is still run to fill the cache, untimed).
    """
    device = input_device(model)
    context = context.to(device)
    min_new_tokens = min(min_new_tokens, max_new_tokens)
    _one_run(model, context, press, min(max_new_tokens, 8), min(min_new_tokens, 8))  # warm-up
    reset_peak_memory(device)
    runs = [_one_run(model, context, press, max_new_tokens, min_new_tokens)
            for _ in tqdm(range(max(1, num_runs)), desc="speed", disable=not progress)]
    out = {
        "context_tokens": int(context.shape[1]), "max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens,
        "num_runs": len(runs), "decode_only": decode_only,
        "decode_tok_per_s": statistics.median(r["decode_tok_per_s"] for r in runs),
        "decode_s": statistics.median(r["decode_s"] for r in runs),
        "new_tokens": runs[-1]["new_tokens"],
        "cache_bytes_after_prefill": runs[-1]["cache_bytes_after_prefill"],
        "cache_len_after_prefill": runs[-1]["cache_len_after_prefill"],
        "cache_bytes_end": runs[-1]["cache_bytes_end"], "cache_len_end": runs[-1]["cache_len_end"],
        "runs": runs,
    }
    if not decode_only:
        out["ttft_s"] = statistics.median(r["ttft_s"] for r in runs)
        out["prefill_tok_per_s"] = context.shape[1] / out["ttft_s"] if out["ttft_s"] > 0 else float("nan")
    out.update(peak_memory_bytes(device))
    return out
