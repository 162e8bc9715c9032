"""RoPE arithmetic shared by every press that moves keys: rotate keys from positions p to q.

RoPE rotates each pair of dimensions (i, i + r/2) of the first ``r`` dimensions of a head (r = the
rotary dimension; the whole head for Llama, ``rotary_pct`` of it for GPT-NeoX) by the angle
``position * inv_freq[i]``. Rotations compose, so a key cached at position p becomes the key at
position q by one more rotation by ``q - p``: no need to recompute it from the pre-RoPE key.
Streaming compaction, R-KV's key rotation and A3's chunk re-alignment all call :func:`rerotate`.

The "rotate-half" layout is used (pairs are (i, i + r/2)), which is how transformers lays out Llama,
Mistral, Qwen and GPT-NeoX heads. Angles are computed in float32 with autocast off, then cast back.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dimension: multiplication by i in RoPE's complex view."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def cos_sin(angles_positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0):
    """cos and sin of shape ``(*positions.shape, r)`` for positions (any integer or float tensor)."""
    device_type = inv_freq.device.type if inv_freq.device.type != "mps" else "cpu"
    with torch.autocast(device_type=device_type, enabled=False):
        freqs = angles_positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(torch.float32)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * scaling, emb.sin() * scaling


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """Rotate ``x`` (..., seq, head_dim) by ``positions`` (broadcastable to (..., seq)).

    Only the first ``r = 2 * len(inv_freq)`` dimensions are rotated (partial rotary); the rest pass
    through. ``scaling`` is the model's ``attention_scaling`` (1 for default RoPE); use 1 for a
    rotation by a position difference, since the scaling was already applied once.
    """
    r = 2 * inv_freq.shape[-1]
    cos, sin = cos_sin(positions, inv_freq, scaling)
    x_rot, x_pass = x[..., :r], x[..., r:]
    out = (x_rot.to(torch.float32) * cos + rotate_half(x_rot.to(torch.float32)) * sin).to(x.dtype)
    return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out


def rerotate(keys: torch.Tensor, from_positions: torch.Tensor, to_positions: torch.Tensor, inv_freq: torch.Tensor):
    """Move RoPE'd ``keys`` (..., seq, head_dim) from ``from_positions`` to ``to_positions`` (each (..., seq)).

    Equal, up to float rounding, to applying RoPE to the pre-RoPE keys at ``to_positions`` directly
    (the test in tests/test_rope.py proves it for full and partial rotary).
    """
    delta = to_positions.to(torch.float32) - from_positions.to(torch.float32)
    return rotate(keys, delta, inv_freq, scaling=1.0)


def shift_into(out: torch.Tensor, keys: torch.Tensor, shift: float, inv_freq: torch.Tensor) -> torch.Tensor:
    """Write into ``out`` the float32 ``keys`` (..., seq, head_dim) all moved by the same ``shift`` positions.

    :func:`rerotate` with one position difference for every key (a whole chunk moved as a block), done in place:
    no temporary the size of the keys, which is what a fused cache of many chunks would otherwise pay per chunk.
    """
    half = inv_freq.shape[-1]
    angles = inv_freq.to(device=keys.device, dtype=torch.float32) * float(shift)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = keys[..., :half], keys[..., half : 2 * half]
    torch.mul(x1, cos, out=out[..., :half]).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=out[..., half : 2 * half]).addcmul_(x1, sin)
    if keys.shape[-1] > 2 * half:
        out[..., 2 * half :] = keys[..., 2 * half :]
    return out
