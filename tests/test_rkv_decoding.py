"""R-KV while decoding against an independent replay, with ``compression_interval < window_size``: the window
queries that score a compression outlive the previous compression, so with ``rotate_keys=True`` they must move
with their keys.

The replay works independently of the press's code: from the attention inputs each layer saw (captured by
``attention_inputs``), it rebuilds every cached key as RoPE(pre-RoPE key, current position) and the scoring
queries as RoPE(pre-RoPE query of the last ``window_size`` tokens, the position their keys have *now*), picks the
kept tokens by attention importance (``mix_lambda=1``: the redundancy term is weighted 0, so this file does not
depend on how redundancy is defined), and moves positions as the docstring of RKVPress says. After every forward
the press's slots (token, position) must equal the replay's. Also: the query buffer's edge cases, a default device
other than the model's, and the press holding no attention inputs older than its window.
"""

from __future__ import annotations

import gc
import math
import weakref
from dataclasses import dataclass

import pytest
import torch
from transformers import DynamicCache

from kvpress_ext.core.adapters import get_adapter
from kvpress_ext.core.apply import apply_press
from kvpress_ext.core.positions import next_position
from kvpress_ext.presses.rkv import RKVPress, rkv_slot_positions
from kvpress_ext.testing import attention_inputs, tiny_model


def _decode_and_record(model, press, prompt_len, steps, seed=0):
    """Greedy decode; returns per-layer attention inputs and, after every forward, each layer's slots."""
    n_layers = len(get_adapter(model).attention_modules(model))
    ids = torch.randint(4, 120, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
    cache, records, logits = DynamicCache(), [], []
    with torch.no_grad(), apply_press(press, model), attention_inputs(model) as inputs:
        tok = ids
        for _ in range(steps + 1):
            out = model(input_ids=tok, past_key_values=cache)
            logits.append(out.logits[:, -1])
            records.append(([tuple(t.clone() for t in rkv_slot_positions(cache, i)) for i in range(n_layers)],
                            next_position(cache)))
            tok = out.logits[:, -1:].argmax(-1)
    return inputs, records, torch.cat(logits)


def _importance(q, k, n_cand):
    """Attention of the window queries (Hq, w, d) over the first n_cand keys (H, L, d), per KV head: logits
    max over the head's query group, softmax over the candidates, mean over the queries (no pooling)."""
    h, d = k.shape[0], k.shape[-1]
    g = q.shape[0] // h
    out = []
    for hi in range(h):
        logits = torch.stack([q[hi * g + j] @ k[hi, :n_cand].T for j in range(g)]).amax(0) / d**0.5
        out.append(logits.softmax(-1).mean(0))
    return torch.stack(out)


def _replay(model, press, inputs, n_forwards):
    """Independent replay of which tokens each layer keeps, at which positions (see the module docstring)."""
    adapter = get_adapter(model)
    budget, w, prefix = press.budget, press.window_size, press.initial_non_compressible_length
    per_layer = []
    next_pos_after = []
    for li, attn in enumerate(adapter.attention_modules(model)):
        with torch.no_grad():
            hidden = torch.cat(inputs[li], dim=1)
            q_pre = adapter.prerope_queries(attn, hidden)[0]  # (Hq, T, d)
            k_pre = adapter.prerope_keys(attn, hidden)[0]  # (H, T, d)
        heads = k_pre.shape[0]
        orig = torch.zeros(heads, 0, dtype=torch.long)
        pos = torch.zeros(heads, 0, dtype=torch.long)
        seen = nxt = 0
        states, nexts = [], []
        for f in range(n_forwards):
            n_new = inputs[li][f].shape[1]
            orig = torch.cat([orig, torch.arange(seen, seen + n_new).expand(heads, -1)], dim=-1)
            pos = torch.cat([pos, torch.arange(nxt, nxt + n_new).expand(heads, -1)], dim=-1)
            seen, nxt = seen + n_new, nxt + n_new
            length = orig.shape[-1]
            if length > budget and (n_new > 1 or length >= budget + press.compression_interval):
                keys = torch.stack([adapter.apply_rope(model, k_pre[h, orig[h]], pos[h]) for h in range(heads)])
                window_tokens, window_pos = orig[0, -w:], pos[0, -w:]  # the window is the same on every head
                assert all(torch.equal(orig[h, -w:], window_tokens) for h in range(heads))
                queries = adapter.apply_rope(model, q_pre[:, window_tokens], window_pos)
                n_cand = length - w
                scores = _importance(queries, keys, n_cand)[:, prefix:]
                top = scores.topk(budget - w - prefix, dim=-1).indices + prefix
                fixed = torch.cat([torch.arange(prefix), torch.arange(length - w, length)])
                keep = torch.cat([top, fixed.expand(heads, -1)], dim=-1).sort(dim=-1).values
                orig, pos = orig.gather(1, keep), pos.gather(1, keep)
                if press.rotate_keys:
                    start = prefix + press.rotation_offset
                    pos = torch.cat([pos[:, :prefix], torch.arange(start, start + budget - prefix).expand(heads, -1)],
                                    dim=-1)
                    nxt = start + budget - prefix
            states.append((orig.clone(), pos.clone()))
            nexts.append(nxt)
        per_layer.append(states)
        next_pos_after.append(nexts)
    assert all(n == next_pos_after[0] for n in next_pos_after)  # every layer moves positions alike
    return per_layer, next_pos_after[0]


@pytest.mark.slow
@pytest.mark.parametrize("interval", [1, 3])  # a query outlives 3 compressions (1) or one (3)
@pytest.mark.parametrize("rotate", [True, False])
@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_decoding_with_interval_below_window_keeps_what_the_replay_keeps(arch, rotate, interval):
    model = tiny_model(arch)
    press = RKVPress(budget=12, window_size=4, compression_interval=interval, kernel_size=1, mix_lambda=1.0,
                     initial_non_compressible_length=2, rotate_keys=rotate, rotation_offset=3)
    inputs, records, _ = _decode_and_record(model, press, prompt_len=20, steps=16)
    expected, expected_next = _replay(model, press, inputs, len(records))
    compressions = 0
    for f, (slots, nxt) in enumerate(records):
        for li, (orig, pos) in enumerate(slots):
            exp_orig, exp_pos = expected[li][f]
            assert orig[0].tolist() == exp_orig.tolist(), f"forward {f}, layer {li}: kept tokens differ"
            assert pos[0].tolist() == exp_pos.tolist(), f"forward {f}, layer {li}: positions differ"
        assert nxt == expected_next[f]
        compressions += slots[0][0].shape[-1] == press.budget
    # a compression on the prefill and then every `interval` tokens, each scored partly by queries from before
    # the last one
    assert compressions == 1 + 16 // interval


def test_rotation_offset_shifts_every_position_alike():
    """RoPE attention depends on position differences only. Without a protected prefix, rotating kept keys to
    start at 0 or at 1000 shifts every key and query (buffered ones included) by the same amount: the same
    tokens are kept at every step and the logits agree."""
    model = tiny_model("llama")
    runs = []
    for offset in (0, 1000):
        press = RKVPress(budget=12, window_size=4, compression_interval=2, rotate_keys=True, rotation_offset=offset)
        _, records, logits = _decode_and_record(model, press, prompt_len=20, steps=16, seed=3)
        runs.append((records, logits))
    (rec_a, logits_a), (rec_b, logits_b) = runs
    for (slots_a, next_a), (slots_b, next_b) in zip(rec_a, rec_b):
        assert next_b - next_a in (0, 1000)  # equal before the first compression, 1000 apart after it
        for (orig_a, pos_a), (orig_b, pos_b) in zip(slots_a, slots_b):
            assert torch.equal(orig_a, orig_b)
            assert ((pos_b - pos_a) == next_b - next_a).all()
    torch.testing.assert_close(logits_a, logits_b, atol=1e-3, rtol=1e-3)


# --- replay cases for the query buffer ---------------------------------------------------------------------------
@dataclass
class _DefaultDeviceElsewhere(RKVPress):
    """The press with torch's default device set elsewhere (``meta``) while its hook runs: every tensor it makes
    must follow the model's tensors, not the default device (e.g. a user's ``torch.set_default_device``)."""

    def forward_hook(self, *args, **kwargs):
        with torch.device("meta"):
            return super().forward_hook(*args, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize(("cls", "params", "prompt_len"), [
    # a 1-token prompt: the buffer fills one token at a time before it holds a window
    (RKVPress, {"window_size": 4, "budget": 12, "compression_interval": 2}, 1),
    # window < prompt < 2 * window: the prefill's buffered inputs are its last window tokens
    (RKVPress, {"window_size": 6, "budget": 9, "compression_interval": 2, "initial_non_compressible_length": 2}, 10),
    # one KV head, and a window (6) other than the number of query heads (4), rotated
    (RKVPress, {"window_size": 6, "budget": 12, "compression_interval": 2, "rotate_keys": True, "kv_heads": 1}, 20),
    (_DefaultDeviceElsewhere, {"window_size": 4, "budget": 12, "compression_interval": 3, "rotate_keys": True,
                               "initial_non_compressible_length": 2, "rotation_offset": 3}, 20),
])
def test_more_decodes_keep_what_the_replay_keeps(cls, params, prompt_len):
    params = dict(params)
    model = tiny_model("llama", kv_heads=params.pop("kv_heads", 2))
    press = cls(kernel_size=1, mix_lambda=1.0, **params)
    inputs, records, _ = _decode_and_record(model, press, prompt_len=prompt_len, steps=20)
    expected, expected_next = _replay(model, press, inputs, len(records))
    compressions = 0
    for f, (slots, nxt) in enumerate(records):
        for li, (orig, pos) in enumerate(slots):
            assert orig[0].tolist() == expected[li][f][0].tolist(), f"forward {f}, layer {li}: kept tokens differ"
            assert pos[0].tolist() == expected[li][f][1].tolist(), f"forward {f}, layer {li}: positions differ"
        assert nxt == expected_next[f]
        compressions += slots[0][0].shape[-1] == press.budget
    assert compressions >= 3


# --- memory: the press holds no attention inputs older than its window ---------------------------------------------
def test_attention_inputs_older_than_the_window_are_released():
    """While decoding one token per forward, the press keeps the attention inputs of the last ``window_size``
    forwards (their queries score the next compression) and lets every older one be freed."""
    model = tiny_model("llama", layers=1)
    window = 4
    press = RKVPress(budget=12, window_size=window, compression_interval=3)
    attn = get_adapter(model).attention_modules(model)[0]
    refs = []
    handle = attn.register_forward_pre_hook(
        lambda m, a, k: refs.append(weakref.ref(k.get("hidden_states", a[0] if a else None))), with_kwargs=True)
    cache = DynamicCache()
    tok = torch.randint(4, 120, (1, 6), generator=torch.Generator().manual_seed(12))
    try:
        with apply_press(press, model), torch.no_grad():
            for step in range(20):
                out = model(input_ids=tok, past_key_values=cache)
                tok = out.logits[:, -1:].argmax(-1)
                del out
                gc.collect(0)  # tensors go by reference counting; the youngest generation catches a stray cycle
                alive = [i for i, r in enumerate(refs) if r() is not None]
                # the prefill (6 tokens >= window) alone covers the window until `window` tokens are decoded
                assert alive == list(range(max(0, step - window + 1), step + 1)), f"step {step}: {alive}"
    finally:
        handle.remove()
    assert math.isfinite(float(cache.layers[0].keys.sum()))
