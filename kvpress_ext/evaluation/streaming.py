"""Long-text perplexity under StreamingLLM-style caches: dense, recompute reference, eager and lazy pruning.

Each function returns ``nll[i] = -log p(ids[i + 1] | context)`` for i = 0 .. len(ids) - 2 (float64 tensor, on the
CPU); :func:`segment_perplexity` turns them into per-segment perplexities. ``ids`` may be on any device: each
forward's tokens go to the model's input device, so a GPU run does the same Python work per forward as a CPU one.
The reference and the streaming runs take ``deadline`` (a ``time.monotonic()`` value): a run that reaches it
returns the predictions made so far (a shorter tensor), so a bounded run on a lent machine still yields a prefix
instead of nothing.
"""

from __future__ import annotations

import math
import time

import torch
from transformers import DynamicCache

from kvpress_ext.core.apply import apply_press
from kvpress_ext.core.devices import input_device
from kvpress_ext.core.errors import KVPressExtError


class StreamingInputError(KVPressExtError):
    """Bad input to the streaming evaluation (no text, a text too short, no saved run to report)."""


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    targets = targets.to(logits.device)
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none").double().cpu()


@torch.no_grad()
def dense_nlls(model, ids: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Growing cache, nothing evicted, positions 0..n-1 (the model runs past its trained length)."""
    cache, out = DynamicCache(), []
    ids = ids.to(input_device(model))
    with apply_press(None, model):
        for start in range(0, len(ids) - 1, chunk):
            piece = ids[start : min(start + chunk, len(ids) - 1)]
            logits = model(input_ids=piece[None], past_key_values=cache).logits[0]
            out.append(_nll(logits, ids[start + 1 : start + 1 + len(piece)]))
    return torch.cat(out)


@torch.no_grad()
def recompute_reference_nlls(model, ids: torch.Tensor, n_sink: int = 4, total: int = 512, batch: int = 16,
                             stride: int = 1, progress=None, deadline: float | None = None) -> torch.Tensor:
    """Sliding window with re-computation: every token is predicted by a cache-free forward over the
    ``n_sink`` first tokens + the most recent ``total - n_sink`` tokens (itself included) at positions
    0..total-1. Windows of ``batch`` targets run as one batch. ``stride > 1`` computes only every
    ``stride``-th target past the first window (the others are NaN): one forward of ``total`` tokens
    per target is the cost StreamingLLM avoids. Stopped at ``deadline``, it returns the targets up to the last one
    computed."""
    n = len(ids) - 1
    ids = ids.to(input_device(model))
    first = min(total, n)
    logits = model(input_ids=ids[None, :first]).logits[0]  # targets whose window is the whole prefix
    out = torch.full((n,), float("nan"), dtype=torch.float64)
    out[:first] = _nll(logits, ids[1 : first + 1])
    recent = total - n_sink
    offsets = torch.arange(recent)
    chosen = torch.arange(first, n, stride)
    for start in range(0, len(chosen), batch):
        if deadline is not None and time.monotonic() >= deadline:
            return out[: int(chosen[start - 1]) + 1 if start else first]
        targets = chosen[start : start + batch]
        idx = torch.cat([torch.arange(n_sink).expand(len(targets), -1), targets[:, None] - recent + 1 + offsets], 1)
        logits = model(input_ids=ids[idx.to(ids.device)], logits_to_keep=1).logits[:, -1]
        out[targets] = _nll(logits, ids[targets + 1])
        if progress:
            progress(int(targets[-1]) + 1, n)
    return out


@torch.no_grad()
def streaming_nlls(model, ids: torch.Tensor, press, deadline: float | None = None) -> torch.Tensor:
    """Stream ``ids`` through ``press`` (a LazyStreamingPress); same NLLs as feeding one token at a time.

    Tokens go in chunks that end exactly where a token-by-token run would compact (first chunk
    ``max_cache + 1`` tokens, then ``slack + 1``): inside a chunk nothing is evicted, so causal attention
    over the chunk equals decoding its tokens one by one. Stopped at ``deadline``, it returns the first
    predictions only.
    """
    n = len(ids) - 1
    ids = ids.to(input_device(model))
    cache, out, start = DynamicCache(), [], 0
    size = press.max_cache + 1
    with apply_press(press, model):
        while start < n and not (out and deadline is not None and time.monotonic() >= deadline):
            piece = ids[start : min(start + size, n)]
            logits = model(input_ids=piece[None], past_key_values=cache).logits[0]
            out.append(_nll(logits, ids[start + 1 : start + 1 + len(piece)]))
            start += len(piece)
            size = press.slack + 1
    return torch.cat(out)


def segment_perplexity(nlls: torch.Tensor, segment: int = 512, where: torch.Tensor | None = None) -> list[float]:
    """Perplexity of each run of ``segment`` predictions (the last one may be shorter), over the
    positions where ``where`` is true (default: where ``nlls`` is not NaN)."""
    where = ~torch.isnan(nlls) if where is None else where
    out = []
    for i in range(0, len(nlls), segment):
        sel = nlls[i : i + segment][where[i : i + segment]]
        out.append(math.exp(float(sel.mean())) if len(sel) else float("nan"))
    return out
