"""Attention of a subset of queries over a whole KV sequence with an explicit (custom) mask.

A3/CacheBlend recompute only some tokens: their queries sit at scattered global positions and attend
to every key at a position <= their own. That is neither a plain causal nor a bottom-right causal mask,
so the mask is built explicitly: ``mask[i, j] = key_positions[j] <= query_positions[i]``.

Two backends:

* PyTorch (always available): ``torch.nn.functional.scaled_dot_product_attention`` with a boolean mask
  (True = may attend), grouped-query attention by repeating KV heads.
* flashinfer (GPU): ``flashinfer.single_prefill_with_kv_cache`` with the mask bit-packed by
  ``flashinfer.packbits``. Chosen only when flashinfer imports, the tensors are on CUDA and in a half
  precision dtype (flashinfer's prefill kernels do not take float32).

:func:`reference_attention` is the explicit-softmax definition both are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # pragma: no cover - not installed on the CPU development machines
    import flashinfer  # type: ignore

    HAS_FLASHINFER = True
except Exception:  # noqa: BLE001 - any import failure means "not usable"
    flashinfer = None
    HAS_FLASHINFER = False


def causal_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Boolean (n_queries, n_keys) mask: query i may see key j iff key_positions[j] <= query_positions[i], and, in a
    sliding-window layer, key_positions[j] > query_positions[i] - window."""
    mask = key_positions.view(1, -1) <= query_positions.view(-1, 1)
    if window is not None:
        mask &= key_positions.view(1, -1) > query_positions.view(-1, 1) - window
    return mask


def choose_backend(q: torch.Tensor, backend: str = "auto") -> str:
    """'flashinfer' when usable for ``q`` (and ``backend`` allows it), else 'torch'."""
    if backend not in ("auto", "torch", "flashinfer"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'flashinfer', got {backend!r}")
    usable = HAS_FLASHINFER and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if backend == "flashinfer" and not usable:
        raise RuntimeError("flashinfer backend requested but flashinfer is not importable or tensors are not CUDA fp16/bf16")
    if backend == "torch":
        return "torch"
    return "flashinfer" if usable else "torch"


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def torch_attention(q, k, v, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q (1, H, nq, d), k/v (1, KVH, nk, d), mask (nq, nk) bool -> (1, H, nq, d)."""
    nq, nk = mask.shape
    if nq == nk and torch.equal(mask, torch.ones_like(mask).tril()):
        # every token active (full recompute): plain causal attention, which has a fused CPU kernel. The whole
        # mask is compared: one query per key at the same (but unsorted) positions also has a True diagonal
        # and n(n+1)/2 Trues without being lower-triangular
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def flashinfer_attention(q, k, v, mask: torch.Tensor, scale: float) -> torch.Tensor:  # pragma: no cover - GPU only
    """Same contract as :func:`torch_attention`, through flashinfer's single-request prefill kernel."""
    packed = flashinfer.packbits(mask.contiguous().view(-1), bitorder="little")
    out = flashinfer.single_prefill_with_kv_cache(
        q[0].transpose(0, 1).contiguous(),  # (nq, H, d): flashinfer's NHD layout
        k[0].transpose(0, 1).contiguous(),
        v[0].transpose(0, 1).contiguous(),
        packed_custom_mask=packed,
        sm_scale=scale,
    )
    return out.transpose(0, 1).unsqueeze(0)


#: query rows per block in :func:`blocked_torch_attention`
QUERY_BLOCK = 128


def blocked_torch_attention(q, k, v, query_positions, key_positions, scale: float, block: int = QUERY_BLOCK,
                            window: int | None = None):
    """:func:`torch_attention` over blocks of ``block`` queries, each against only the keys it can see.

    With keys in ascending position order, a block of queries needs keys up to its largest position
    only; the keys after it are all masked. Cutting them off skips most of the masked half of the
    (n_selected x n_keys) score matrix, as a causal kernel does for a full prefill. Exact: a query's
    visible keys all lie inside its block's prefix.
    """
    nq = q.shape[-2]
    qpos, kpos = query_positions.to(q.device), key_positions.to(q.device)
    sorted_keys = kpos.numel() < 2 or bool((kpos[1:] >= kpos[:-1]).all())
    if nq <= block or not sorted_keys or nq == kpos.numel():
        return torch_attention(q, k, v, causal_mask(qpos, kpos, window), scale)
    out = q.new_empty(q.shape)
    for start in range(0, nq, block):
        rows = slice(start, min(start + block, nq))
        visible = int(torch.searchsorted(kpos, qpos[rows].max(), right=True))
        if visible == 0:  # no key visible: softmax over nothing; define the output as zeros
            out[:, :, rows] = 0
            continue
        mask = causal_mask(qpos[rows], kpos[:visible], window)
        out[:, :, rows] = torch_attention(q[:, :, rows], k[:, :, :visible], v[:, :, :visible], mask, scale)
    return out


def masked_attention(q, k, v, query_positions, key_positions, scale: float, backend: str = "auto",
                     window: int | None = None) -> torch.Tensor:
    """Attention of queries at ``query_positions`` over keys at ``key_positions`` (see module docstring); ``window``
    for a sliding-window layer."""
    if choose_backend(q, backend) == "flashinfer":  # pragma: no cover - GPU only
        mask = causal_mask(query_positions.to(q.device), key_positions.to(q.device), window)
        return flashinfer_attention(q, k, v, mask, scale)
    return blocked_torch_attention(q, k, v, query_positions, key_positions, scale, window=window)


def attention_probs(q, k, query_positions, key_positions, scale: float, window: int | None = None) -> torch.Tensor:
    """Softmax attention weights (1, H, nq, nk) in float32, for token selection (a few queries only)."""
    groups = q.shape[1] // k.shape[1]
    scores = torch.matmul(q.float(), _repeat_kv(k, groups).float().transpose(-1, -2)) * scale
    mask = causal_mask(query_positions.to(q.device), key_positions.to(q.device), window)
    return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)


def reference_attention(q, k, v, query_positions, key_positions, scale: float) -> torch.Tensor:
    """Explicit softmax(QK^T * scale + mask) V in float64: the definition the backends are tested against."""
    probs = attention_probs(q.double(), k.double(), query_positions, key_positions, scale)
    groups = q.shape[1] // k.shape[1]
    return torch.matmul(probs.double(), _repeat_kv(v, groups).double()).to(q.dtype)
