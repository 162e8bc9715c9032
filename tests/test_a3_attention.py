"""A³'s masked attention (presses/a3/attention.py) against an explicit per-query loop: scales other
than 1/sqrt(head_dim), 2 KV-head groups, unsorted or repeated key positions, queries that see no key, the
full-recompute fast path, the backend rules, the dtype."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvpress_ext.presses.a3 import attention as A
from kvpress_ext.testing import FlashinferStandIn

SCALE = 0.3  # not 1/sqrt(16) = 0.25, the default a dropped scale would fall back to
TOL = 1e-5  # float32 kernels against a float64 loop


pytestmark = pytest.mark.usefixtures("one_thread")


def _qkv(seed, heads, kv_heads, nq, nk, d=16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, heads, nq, d, generator=g), torch.randn(1, kv_heads, nk, d, generator=g),
            torch.randn(1, kv_heads, nk, d, generator=g))


def _explicit(q, k, v, qpos, kpos, scale):
    """softmax(q·k * scale) v over the keys at positions <= the query's, one query and head at a time, in float64;
    a query that sees no key gets zeros. Head h reads KV head h // (heads / kv_heads)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for h in range(heads):
        kh, vh = k[0, h // (heads // kv_heads)].double(), v[0, h // (heads // kv_heads)].double()
        for i in range(q.shape[2]):
            seen = kpos <= qpos[i]
            if seen.any():
                p = ((kh[seen] @ q[0, h, i].double()) * scale).softmax(-1)
                out[0, h, i] = p @ vh[seen]
    return out


@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2), (6, 2)])
def test_backends_and_reference_match_the_explicit_loop(heads, kv_heads):
    q, k, v = _qkv(0, heads, kv_heads, 7, 20)
    qpos, kpos = torch.tensor([0, 3, 4, 9, 15, 18, 19]), torch.arange(20)
    want = _explicit(q, k, v, qpos, kpos, SCALE)
    ref = A.reference_attention(q, k, v, qpos, kpos, SCALE)
    assert ref.dtype == q.dtype and ref.shape == q.shape
    assert (ref.double() - want).abs().max() < TOL
    assert (A.masked_attention(q, k, v, qpos, kpos, SCALE) - want).abs().max() < TOL
    assert (A.blocked_torch_attention(q, k, v, qpos, kpos, SCALE, block=2) - want).abs().max() < TOL
    probs = A.attention_probs(q, k, qpos, kpos, SCALE)
    assert probs.dtype == torch.float32 and probs.shape == (1, heads, 7, 20)
    assert torch.allclose(probs.sum(-1), torch.ones(1, heads, 7))
    assert (probs[..., ~A.causal_mask(qpos, kpos)] == 0).all()  # a key after the query gets no weight


def test_causal_mask_compares_positions_not_indices():
    qpos, kpos = torch.tensor([5, 2]), torch.tensor([2, 7, 5, 0])
    assert A.causal_mask(qpos, kpos).tolist() == [[True, False, True, True], [True, False, False, True]]


def test_every_token_active_with_unsorted_positions_is_not_plain_causal():
    """qpos == kpos == a permutation: every query sees its own key and n(n+1)/2 keys in all, yet the mask is not
    lower-triangular, so the is_causal fast path of a full recompute must not be taken (it was: a bug)."""
    q, k, v = _qkv(1, 2, 2, 6, 6)
    perm = torch.tensor([2, 5, 3, 0, 1, 4])
    assert (A.masked_attention(q, k, v, perm, perm, SCALE) - _explicit(q, k, v, perm, perm, SCALE)).abs().max() < TOL
    ordered = torch.arange(6)  # the genuine full recompute still matches, with and without grouped KV heads
    for q, k, v in (_qkv(1, 2, 2, 6, 6), _qkv(2, 4, 2, 6, 6)):
        want = _explicit(q, k, v, ordered, ordered, SCALE)
        assert (A.masked_attention(q, k, v, ordered, ordered, SCALE) - want).abs().max() < TOL
        assert (A.torch_attention(q, k, v, A.causal_mask(ordered, ordered), SCALE) - want).abs().max() < TOL


@pytest.mark.parametrize("kpos", [[1, 0], [3, 0, 2, 1, 9, 4, 6, 5, 8, 7], [0, 1, 2, 3, 4, 9, 5, 6, 7, 8]])
def test_unsorted_keys_with_more_queries_than_a_block(kpos):
    """Keys out of position order cannot be cut at the block's largest position; the result still matches."""
    kpos = torch.tensor(kpos)
    qpos = torch.tensor([9, 0, 1, 4, 6])
    q, k, v = _qkv(2, 4, 2, len(qpos), len(kpos))
    want = _explicit(q, k, v, qpos, kpos, SCALE)
    seen_any = (kpos.view(1, -1) <= qpos.view(-1, 1)).any(-1)
    out = A.blocked_torch_attention(q, k, v, qpos, kpos, SCALE, block=1)
    assert (out[:, :, seen_any] - want[:, :, seen_any]).abs().max() < TOL


def test_repeated_key_positions_and_a_query_at_the_largest_one():
    """Keys sharing a position are all visible to a query at that position (the block's cut is inclusive)."""
    kpos = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 6, 6])
    qpos = torch.tensor([1, 3, 6, 0, 4])
    q, k, v = _qkv(3, 2, 1, len(qpos), len(kpos))
    want = _explicit(q, k, v, qpos, kpos, SCALE)
    for block in (1, 2, 3):
        assert (A.blocked_torch_attention(q, k, v, qpos, kpos, SCALE, block=block) - want).abs().max() < TOL


def test_queries_that_see_no_key_get_zeros_and_later_blocks_are_still_computed():
    kpos = torch.arange(5, 40)
    qpos = torch.tensor([0, 3, 5, 6, 12, 39])  # two queries before every key, then one that sees one key
    q, k, v = _qkv(4, 4, 2, len(qpos), len(kpos))
    want = _explicit(q, k, v, qpos, kpos, SCALE)
    for block in (1, 2):
        out = A.blocked_torch_attention(q, k, v, qpos, kpos, SCALE, block=block)
        assert torch.equal(out[:, :, :2], torch.zeros_like(out[:, :, :2]))
        assert (out[:, :, 2:] - want[:, :, 2:]).abs().max() < TOL
        assert (out[0, :, 2] - v.repeat_interleave(2, 1)[0, :, 0]).abs().max() < 1e-6  # sees key 5 only


def test_many_blocks_of_scattered_queries():
    """More queries than a default block, over sorted keys: every block matches the loop."""
    g = torch.Generator().manual_seed(5)
    n = 400
    qpos = torch.randperm(n, generator=g)[:300].sort().values
    q, k, v = _qkv(6, 2, 1, len(qpos), n, d=8)
    out = A.blocked_torch_attention(q, k, v, qpos, torch.arange(n), SCALE)
    assert (out - _explicit(q, k, v, qpos, torch.arange(n), SCALE)).abs().max() < TOL


def test_choose_backend_rules(monkeypatch):
    cpu = torch.zeros(1, 1, 1, 4)
    with pytest.raises(ValueError, match=r"^backend must be 'auto', 'torch' or 'flashinfer', got 'nope'$"):
        A.choose_backend(cpu, "nope")
    monkeypatch.setattr(A, "HAS_FLASHINFER", False)
    assert A.choose_backend(cpu) == "torch" and A.choose_backend(cpu, "torch") == "torch"
    fp16_cuda = SimpleNamespace(is_cuda=True, dtype=torch.float16)  # choose_backend reads only these two
    assert A.choose_backend(fp16_cuda) == "torch"
    msg = r"^flashinfer backend requested but flashinfer is not importable or tensors are not CUDA fp16/bf16$"
    with pytest.raises(RuntimeError, match=msg):
        A.choose_backend(fp16_cuda, "flashinfer")
    monkeypatch.setattr(A, "HAS_FLASHINFER", True)  # as on a GPU machine with flashinfer installed
    for dtype in (torch.float16, torch.bfloat16):
        on_gpu = SimpleNamespace(is_cuda=True, dtype=dtype)
        assert A.choose_backend(on_gpu) == "flashinfer" and A.choose_backend(on_gpu, "flashinfer") == "flashinfer"
        assert A.choose_backend(on_gpu, "torch") == "torch"
        assert A.choose_backend(SimpleNamespace(is_cuda=False, dtype=dtype)) == "torch"
    fp32_cuda = SimpleNamespace(is_cuda=True, dtype=torch.float32)
    assert A.choose_backend(fp32_cuda) == "torch"
    with pytest.raises(RuntimeError, match=msg):
        A.choose_backend(fp32_cuda, "flashinfer")
    with pytest.raises(RuntimeError, match=msg):
        A.choose_backend(SimpleNamespace(is_cuda=False, dtype=torch.float16), "flashinfer")


def test_masked_attention_hands_the_flashinfer_branch_the_mask_and_scale(monkeypatch):
    """When the backend is flashinfer, masked_attention builds the causal mask from the positions and passes the
    scale (a stand-in kernel on CPU; the real one is compared on a GPU in test_a3.py)."""
    calls, kernel_calls = [], []

    class Recording(FlashinferStandIn):
        @staticmethod
        def single_prefill_with_kv_cache(*args, **kwargs):
            kernel_calls.append(1)
            return FlashinferStandIn.single_prefill_with_kv_cache(*args, **kwargs)

    monkeypatch.setattr(A, "flashinfer", Recording)
    monkeypatch.setattr(A, "choose_backend", lambda q, backend="auto": calls.append((q, backend)) or "flashinfer")
    q, k, v = _qkv(7, 4, 2, 5, 12)
    qpos, kpos = torch.tensor([2, 4, 7, 10, 11]), torch.arange(12)
    out = A.masked_attention(q, k, v, qpos, kpos, SCALE, backend="flashinfer")
    assert len(calls) == 1 and calls[0][0] is q and calls[0][1] == "flashinfer" and kernel_calls == [1]
    assert out.shape == q.shape and (out - _explicit(q, k, v, qpos, kpos, SCALE)).abs().max() < TOL


def test_each_block_is_computed_against_only_the_keys_it_can_see(monkeypatch):
    """The point of the blocked path (its docstring): a block of queries is scored against the keys up to its
    largest position, not all keys. The kernel calls are recorded: (queries, keys) per call."""
    calls = []
    kernel = A.torch_attention
    monkeypatch.setattr(A, "torch_attention", lambda q, k, v, mask, scale: calls.append(tuple(mask.shape))
                        or kernel(q, k, v, mask, scale))
    n = 50
    q, k, v = _qkv(8, 2, 1, 7, n)
    qpos = torch.tensor([3, 4, 10, 11, 20, 30, 40])
    out = A.blocked_torch_attention(q, k, v, qpos, torch.arange(n), SCALE, block=3)
    assert calls == [(3, 11), (3, 31), (1, 41)] and (out - _explicit(q, k, v, qpos, torch.arange(n), SCALE)).abs().max() < TOL
    calls.clear()
    A.blocked_torch_attention(q, k, v, qpos, torch.arange(n), SCALE, block=7)  # one block: one call, every key
    assert calls == [(7, n)]
    calls.clear()
    A.blocked_torch_attention(q[:, :, :6], k, v, qpos[:6], torch.arange(n), SCALE, block=5)
    assert calls == [(5, 21), (1, 31)]
    calls.clear()
    repeated = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 6, 6, 7, 8])  # sorted, with ties: still cut per block
    q, k, v = _qkv(10, 2, 1, 4, 12)
    A.blocked_torch_attention(q, k, v, torch.tensor([1, 3, 4, 6]), repeated, SCALE, block=2)
    assert calls == [(2, 7), (2, 10)]
    calls.clear()
    full = torch.arange(12)  # every token active: one causal pass
    q, k, v = _qkv(9, 2, 1, 12, 12)
    A.blocked_torch_attention(q, k, v, full, full, SCALE, block=5)
    assert calls == [(12, 12)]


def test_full_recompute_uses_the_causal_kernel_and_partial_ones_the_mask(monkeypatch):
    """A full recompute (every query at its own key's position, in order) is handed to SDPA as is_causal, which
    has a fused kernel; anything else passes the explicit boolean mask."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, is_causal=False, **kw):
        seen.append((attn_mask is None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(A.F, "scaled_dot_product_attention", recording)
    q, k, v = _qkv(11, 4, 2, 9, 9)
    full = torch.arange(9)
    A.torch_attention(q, k, v, A.causal_mask(full, full), SCALE)
    assert seen == [(True, True)]
    seen.clear()
    for qpos, kpos in ((full, full.flip(0)), (torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 7]), full), (full + 1, full)):
        A.torch_attention(q, k, v, A.causal_mask(qpos, kpos), SCALE)
    assert seen == [(False, False)] * 3
