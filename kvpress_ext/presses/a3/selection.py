"""Which document tokens A3/CacheBlend recompute: budgets, pooling and per-strategy scores.

All functions work on document-token indices 0..n_doc-1 (the prefix and the question are handled by
the caller: the prefix is never a candidate, the question is always recomputed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvpress_ext.core.errors import CacheFormatError


def budget(rate: float, n_candidates: int) -> int:
    """``int(rate * n)`` tokens, clamped to [1, n] (0 when there are no candidates)."""
    if n_candidates <= 0:
        return 0
    return max(1, min(n_candidates, int(rate * n_candidates)))


def avg_pool(scores: torch.Tensor, width: int) -> torch.Tensor:
    """Average pooling along the token axis with stride 1 and the same length (zero padding not counted)."""
    if width <= 1:
        return scores
    x = scores.float().view(1, 1, -1)
    pooled = F.avg_pool1d(x, width, stride=1, padding=width // 2, count_include_pad=False)
    return pooled.view(-1)[: scores.numel()]


def top_k(scores: torch.Tensor, k: int, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted indices of the ``k`` highest scores; ``forced`` indices are taken first."""
    scores = scores.float().clone()
    if forced is not None and forced.numel():
        scores[forced] = float("inf")
        k = max(k, int(forced.unique().numel()))
    k = min(k, scores.numel())
    return torch.topk(scores, k).indices.sort().values


def largest_remainder(lengths: list[int], total: int) -> list[int]:
    """Split ``total`` over chunks proportionally to ``lengths`` (Hamilton / largest-remainder method)."""
    n = sum(lengths)
    if n == 0 or total <= 0:
        return [0] * len(lengths)
    quotas = [total * length / n for length in lengths]
    shares = [int(q) for q in quotas]
    order = sorted(range(len(lengths)), key=lambda i: (-(quotas[i] - shares[i]), i))
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return [min(s, length) for s, length in zip(shares, lengths)]


def surprisal_chunk(surprisals: list[torch.Tensor], lengths: list[int], k: int) -> torch.Tensor:
    """Top surprisal tokens within each chunk, the budget ``k`` split across chunks by length."""
    if len(surprisals) != len(lengths):
        raise CacheFormatError(f"Got surprisal for {len(surprisals)} chunks but {len(lengths)} chunks to fuse.")
    picked, offset = [], 0
    for s, length, share in zip(surprisals, lengths, largest_remainder(lengths, k)):
        if s is None or s.numel() != length:
            got = None if s is None else s.numel()
            raise CacheFormatError(
                f"Stored surprisal has {got} values for a chunk of {length} tokens: it does not belong to this "
                "chunk. Rebuild the chunk store with save_surprisal=True."
            )
        if share:
            picked.append(torch.topk(s.float(), share).indices + offset)
        offset += length
    if not picked:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat(picked).sort().values


def random_tokens(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:k].sort().values


def value_deviation(v_new: torch.Tensor, v_old: torch.Tensor) -> torch.Tensor:
    """CacheBlend's score: sum over heads and dims of (V_new - V_old)^2, per token. Inputs (1, KVH, n, d)."""
    return (v_new.float() - v_old.float()).pow(2).sum(dim=(0, 1, 3))


def attention_relevance(probs: torch.Tensor, doc_slice: slice, pool_width: int) -> torch.Tensor:
    """A3's score: attention (1, H, nq, nk) summed over heads and queries on document keys, then pooled."""
    return avg_pool(probs[..., doc_slice].sum(dim=(0, 1, 2)), pool_width)
