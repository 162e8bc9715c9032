"""kvpress_ext.core.rope against an independent complex-number formulation of RoPE (float64 reference).

RoPE turns each rotary pair (x_i, x_{i + r/2}) into the complex number x_i + i x_{i + r/2} and multiplies it
by exp(i * position * inv_freq[i]); the ``r`` rotary dims are the first ones, the rest pass through.
"""

import pytest
import torch

from kvpress_ext.core import rope


def _inv_freq(r, base=10000.0, dtype=torch.float32):
    return (1.0 / base ** (torch.arange(0, r, 2, dtype=torch.float64) / r)).to(dtype)


def _reference(x, positions, inv_freq, scaling=1.0):
    """float64 RoPE by complex multiplication, on the first 2 * len(inv_freq) dims."""
    r = 2 * inv_freq.shape[-1]
    x = x.double()
    z = torch.complex(x[..., : r // 2], x[..., r // 2 : r])
    angle = positions.double().unsqueeze(-1) * inv_freq.double()
    z = z * torch.polar(torch.ones_like(angle), angle) * scaling
    return torch.cat([z.real, z.imag, x[..., r:]], dim=-1)


@pytest.mark.parametrize("r", [16, 4])  # full and partial rotary of a 16-dim head
@pytest.mark.parametrize("scaling", [1.0, 1.7])  # 1.7: a model's attention_scaling (e.g. YaRN)
def test_rotate_matches_complex_reference(r, scaling):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 16, generator=g)
    positions = torch.tensor([0, 1, 2, 5, 8, 13, 100, 1000, 4095])
    inv = _inv_freq(r)
    out = rope.rotate(x, positions, inv, scaling)
    assert out.shape == x.shape and out.dtype == x.dtype
    # float32 angles: position 4095 times a float32 frequency is off by up to ~2.5e-4 rad
    torch.testing.assert_close(out.double(), _reference(x, positions, inv, scaling), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(out[..., r:], x[..., r:], atol=0, rtol=0)  # pass-through dims untouched


def test_cos_sin_tables_and_scaling():
    inv = _inv_freq(8)
    positions = torch.arange(50)
    cos, sin = rope.cos_sin(positions, inv)  # default scaling: 1
    angle = positions.double().unsqueeze(-1) * inv.double()
    angle = torch.cat([angle, angle], dim=-1)
    assert cos.shape == sin.shape == (50, 8)
    torch.testing.assert_close(cos.double(), angle.cos(), atol=1e-5, rtol=0)
    torch.testing.assert_close(sin.double(), angle.sin(), atol=1e-5, rtol=0)
    cos2, sin2 = rope.cos_sin(positions, inv, 2.5)
    torch.testing.assert_close(cos2, 2.5 * cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin2, 2.5 * sin, atol=1e-6, rtol=0)


def test_angles_are_float32_whatever_the_input_dtypes():
    """The module promises float32 angles: float64 positions or frequencies give the float32 tables."""
    inv = _inv_freq(8)
    positions = torch.arange(0, 3000, 7)
    cos, sin = rope.cos_sin(positions, inv)
    for pos_in, inv_in in ((positions.double(), inv), (positions, inv.double()), (positions.double(), inv.double())):
        c, s = rope.cos_sin(pos_in, inv_in)
        assert c.dtype == s.dtype == torch.float32
        assert torch.equal(c, cos) and torch.equal(s, sin)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_rotation_is_computed_in_float32_and_cast_back(dtype):
    """Keys stored in any dtype are rotated in float32 and returned in their own dtype: the same numbers as
    rotating the float32 copy and casting the result (no precision lost, none invented)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 7, 16, generator=g).to(dtype)
    positions = torch.tensor([3, 9, 17, 100, 400, 401, 2000])
    inv = _inv_freq(4)
    out = rope.rotate(x, positions, inv)
    assert out.dtype == dtype
    assert torch.equal(out, rope.rotate(x.float(), positions, inv).to(dtype))


def test_rotate_empty_sequence_keeps_the_head_shape():
    """Zero tokens (an empty cache slice) keep the whole head, pass-through dims included."""
    for shape in ((1, 2, 0, 16), (2, 0, 16), (0, 16)):  # any leading dims: (..., seq, head_dim)
        out = rope.rotate(torch.zeros(shape), torch.zeros(0, dtype=torch.long), _inv_freq(4))
        assert out.shape == shape


@pytest.mark.parametrize("r", [16, 4])
def test_rerotate_equals_rope_at_the_new_positions(r):
    """Rotating keys cached at p by (q - p) gives RoPE at q directly, for moves forwards and backwards, with
    a model's attention_scaling applied once (at caching), not again by the move."""
    g = torch.Generator().manual_seed(2)
    pre = torch.randn(1, 2, 12, 16, generator=g)
    inv = _inv_freq(r)
    old = torch.arange(12) * 5 + 3
    new = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 500, 60])
    for scaling in (1.0, 1.3):
        cached = rope.rotate(pre, old, inv, scaling)
        moved = rope.rerotate(cached, old, new, inv)
        torch.testing.assert_close(moved.double(), _reference(pre, new, inv, scaling), atol=1e-4, rtol=1e-4)
    back = rope.rerotate(moved, new, old, inv)
    torch.testing.assert_close(back, cached, atol=1e-5, rtol=1e-5)


def test_rotate_half():
    x = torch.arange(6.0)
    assert rope.rotate_half(x).tolist() == [-3.0, -4.0, -5.0, 0.0, 1.0, 2.0]


@pytest.mark.parametrize("r", [8, 4])  # full and partial rotary of a 8-dim head
@pytest.mark.parametrize("shift", [37, -5, 0])
def test_shift_into_equals_rerotate_by_a_constant_difference(r, shift):
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 3, 11, 8, generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, r, 2).float() / r))
    start = torch.arange(4, 15)
    ref = rope.rerotate(keys, start, start + shift, inv)
    out = torch.full_like(keys, float("nan"))[:, :, :11]  # a strided destination, as a slice of a fused cache is
    assert rope.shift_into(out, keys, shift, inv) is out
    assert (out - ref).abs().max() < 1e-5
