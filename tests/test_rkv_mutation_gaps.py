"""R-KV while decoding with ``compression_interval < window_size``: the window queries that score a compression
outlive the previous compression, so with ``rotate_keys=True`` they must move with their keys.

The reference below replays the whole decode independently of the press's code: from the attention inputs
each layer saw (captured by a pre-hook), it rebuilds every cached key as RoPE(pre-RoPE key, current
position) and the scoring queries as RoPE(pre-RoPE query of the last ``window_size`` tokens, the position
their keys have *now*), picks the kept tokens by attention importance (``mix_lambda=1``: the redundancy term
is weighted 0, so this file does not depend on how redundancy is defined), and moves positions as the
docstring of RKVPress says. After every forward the press's slots (token, position) must equal the replay's.

The later sections close the other gaps mutation testing found (issue #16): the scoring functions on any
leading shape, their defaults and edge values against the loop reference of tests/test_rkv.py, every press
parameter reaching the selection, parameter checks, the schedule's edges, a cache filled elsewhere, a default
device other than the model's, and the press holding no attention inputs older than its window.
"""

from __future__ import annotations

import gc
import math
import weakref
from dataclasses import dataclass

import pytest
import torch
from test_rkv import clustered_qk, reference_kept, reference_redundancy, reference_similarity
from transformers import DynamicCache

from kvpress_ext.core.adapters import get_adapter
from kvpress_ext.core.apply import apply_press
from kvpress_ext.core.errors import PressParameterError
from kvpress_ext.core.positions import next_position, position_state
from kvpress_ext.presses.rkv import (
    RKVPress,
    retained_index,
    rkv_redundancy,
    rkv_scores,
    rkv_select,
    rkv_slot_positions,
)
from kvpress_ext.storage.cache_files import load_cache, save_cache
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


# --- what the press hands rkv_select: every press parameter reaches the selection ---------------------------------
def _compressions(model, press, prompt_len=8, steps=24, seed=5):
    """For every compression of layer 0 while decoding: the cache's keys, the window's scoring queries (rebuilt from
    that layer's inputs with RoPE at their keys' positions, as in tests/test_rkv.py) and the tokens the press kept."""
    adapter = get_adapter(model)
    attn0 = adapter.attention_modules(model)[0]
    w, budget = press.window_size, press.budget
    hidden, before, after = [], [], []

    def inputs(module, args, kwargs):
        hidden.append(kwargs.get("hidden_states", args[0] if args else None).detach())

    def pre_press(module, args, kwargs, output):  # registered before the press's hook: sees the cache before it
        cache = kwargs["past_key_values"]
        if cache.layers[0].keys.shape[-2] >= budget + press.compression_interval:
            orig, pos = rkv_slot_positions(cache, 0)
            state = position_state(cache)
            orig = torch.cat([orig, torch.full_like(orig[..., :1], state.seen_tokens - 1)], dim=-1)
            pos = torch.cat([pos, torch.full_like(pos[..., :1], state.next_position - 1)], dim=-1)
            before.append((cache.layers[0].keys.clone(), orig, pos))

    def post_press(module, args, kwargs, output):
        if len(after) < len(before):
            after.append(rkv_slot_positions(kwargs["past_key_values"], 0)[0].clone())

    handles = [attn0.register_forward_pre_hook(inputs, with_kwargs=True),
               attn0.register_forward_hook(pre_press, with_kwargs=True)]
    ids = torch.randint(4, 120, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
    cache = DynamicCache()
    try:
        with apply_press(press, model), torch.no_grad():
            handles.append(attn0.register_forward_hook(post_press, with_kwargs=True))
            out = model(input_ids=ids, past_key_values=cache)
            for _ in range(steps):
                out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache)
    finally:
        for h in handles:
            h.remove()
    hidden = torch.cat(hidden, dim=1)
    result = []
    for (keys, orig, pos), kept in zip(before, after):
        with torch.no_grad():
            q = adapter.prerope_queries(attn0, hidden[:, orig[0, 0, -w:]])
        result.append((keys, adapter.apply_rope(model, q, pos[0, 0, -w:]), orig, kept))
    return result


@pytest.mark.parametrize("params", [
    {"retain_direction": "first_percent", "retain_ratio": 0.9},
    {"retain_direction": "first", "retain_ratio": 0.9},
])
def test_press_passes_direction_and_ratio_to_the_selection(params):
    """mix_lambda=0 (redundancy only): each compression keeps what rkv_select keeps with the press's direction and
    ratio; the check is able to fail because another direction or ratio keeps other tokens on these keys."""
    model = tiny_model("llama")
    common = {"kernel_size": 3, "mix_lambda": 0.0}
    press = RKVPress(budget=12, window_size=4, compression_interval=3, **common, **params)
    records = _compressions(model, press)
    assert len(records) >= 5
    others = [{**params, "retain_ratio": 0.1}, {**params, "retain_direction": "last"}]
    differs = [0, 0]
    for keys, q, orig, kept in records:
        def kept_by(p, keys=keys, q=q, orig=orig):
            return orig.gather(2, rkv_select(q, keys, 12, 4, 0, **common, **p))

        assert torch.equal(kept_by(params), kept)
        differs = [d + (not torch.equal(kept_by(o), kept)) for d, o in zip(differs, others)]
    assert differs[1] > 0 and (differs[0] > 0 or params["retain_direction"] == "first")  # "first" ignores the ratio


# --- the scoring functions: any leading shape, defaults, edge values ---------------------------------------------
def _reference_retained(row, direction, ratio):
    """Loop reference of the retained column of one mask row (see the reference in tests/test_rkv.py)."""
    similar = [j for j, m in enumerate(row) if m]
    encoded = sorted(j if m else 0 for j, m in enumerate(row))
    k = max(1, int(len(row) * ratio))
    if direction == "first":
        return similar[0] if similar else 0
    if direction in ("last", "last_percent"):
        return similar[-1] if similar else 0
    return encoded[k - 1]


@pytest.mark.parametrize("direction", ["last", "first", "last_percent", "first_percent"])
@pytest.mark.parametrize("ratio", [0.01, 0.3, 0.6, 1.0])
def test_retained_index_equals_loop_reference_on_any_mask(direction, ratio):
    """Masks that are not symmetric, rows with no similar column, with only column 0, and with every column."""
    gen = torch.Generator().manual_seed(7)
    n = 12
    mask = torch.rand(3, n, n, generator=gen) < torch.tensor([0.15, 0.5, 0.9]).view(3, 1, 1)
    mask[0, 0] = False
    mask[0, 1] = torch.arange(n) == 0
    mask[0, 2] = True
    mask[1, 3] = torch.arange(n) != 0
    got = retained_index(mask, direction, ratio)
    expected = [[_reference_retained(row, direction, ratio) for row in m.tolist()] for m in mask]
    assert got.tolist() == expected


def test_retained_index_defaults_and_bad_direction():
    # dense rows of 30 columns: "first_percent" with the default ratio 0.1 (k = 3) spares a column > 0 in some
    mask = torch.rand(2, 30, 30, generator=torch.Generator().manual_seed(8)) < 0.95
    rows = mask.reshape(-1, 30).tolist()
    assert retained_index(mask).flatten().tolist() == [_reference_retained(r, "last", 0.1) for r in rows]
    expected = [_reference_retained(r, "first_percent", 0.1) for r in rows]
    assert retained_index(mask, "first_percent").flatten().tolist() == expected
    assert any(expected)
    with pytest.raises(PressParameterError, match="retain_direction must be one of"):
        retained_index(mask, "middle")


def _reference_redundancy(keys, direction="last", ratio=0.1):
    """rkv_redundancy's loop reference for keys (..., L, d), any leading shape."""
    flat = keys.reshape(-1, *keys.shape[-2:])
    out = [reference_redundancy(reference_similarity(k.double().tolist()), direction, ratio) for k in flat]
    return torch.tensor(out, dtype=torch.float64).reshape(keys.shape[:-1])


@pytest.mark.parametrize("shape", [(1, 2), (2,), ()])  # leading dims: (B, H), (H,), none
def test_redundancy_of_keys_with_any_leading_shape(shape):
    _, keys = clustered_qk(1, n=40, clusters=3, kv_heads=2, d=16, noise=0.2, singles=0.1)
    keys = keys[(0,) * (2 - len(shape))]  # (1, 2, 40, 16) -> the leading shape asked for
    assert keys.shape == (*shape, 40, 16)
    for direction, ratio in (("last", 0.1), ("first_percent", 0.9)):
        got = rkv_redundancy(keys, direction, ratio)
        assert got.shape == keys.shape[:-1]
        torch.testing.assert_close(got.double(), _reference_redundancy(keys, direction, ratio), atol=1e-7, rtol=1e-5)
    # the defaults ("last", ratio 0.1), on keys of one tight cluster (every key similar to every other), where
    # "first_percent" at ratio 0.1 spares another column than at ratio 1
    _, keys = clustered_qk(4, n=40, clusters=1, kv_heads=2, d=16, noise=0.2, singles=0.0)
    keys = keys[(0,) * (2 - len(shape))]
    torch.testing.assert_close(rkv_redundancy(keys).double(), _reference_redundancy(keys), atol=1e-7, rtol=1e-5)
    expected = _reference_redundancy(keys, "first_percent", 0.1)
    torch.testing.assert_close(rkv_redundancy(keys, "first_percent").double(), expected, atol=1e-7, rtol=1e-5)
    assert not torch.allclose(expected, _reference_redundancy(keys, "first_percent", 1.0), atol=1e-6, rtol=0)


def test_redundancy_at_the_threshold_and_for_a_near_zero_key():
    """Similar means cosine > 0.5 (strictly): two keys at exactly 0.5 are not similar. A key of norm 1e-8 (the
    epsilon added to the norm) keeps every value finite."""
    keys = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, -1.0], [1.0, 0.0, 0.0, 0.0], [-1.0, 2.0, 0.5, 0.0],
                         [1e-8, 0.0, 0.0, 0.0], [0.0, -1.0, 2.0, 1.0]])
    assert rkv_redundancy(keys[:2]).isfinite().all()
    sim = keys[:2] / keys[:2].norm(dim=-1, keepdim=True)
    assert (sim[0] @ sim[1]).item() == 0.5
    for direction in ("last", "first"):
        got = rkv_redundancy(keys, direction)
        assert got.isfinite().all()
        torch.testing.assert_close(got.double(), _reference_redundancy(keys, direction), atol=1e-7, rtol=1e-5)


def test_scores_defaults_and_ratio():
    """rkv_scores' defaults are the published ones (kernel 7, lambda 0.07, "last", ratio 0.1); the ratio reaches
    the redundancy."""
    queries, keys = clustered_qk(1, n=60, clusters=1, kv_heads=2, q_heads=4, d=16, window=4, noise=0.2, singles=0.0)
    _, ref = reference_kept(queries, keys, 30, 4, 7, 0.07, "last")
    torch.testing.assert_close(rkv_scores(queries, keys, 4)[0].double(), torch.tensor(ref, dtype=torch.float64),
                               atol=1e-7, rtol=1e-5)
    for ratio in (0.1, 0.9):
        _, ref = reference_kept(queries, keys, 30, 4, 7, 0.07, "first_percent", ratio=ratio)
        kwargs = {"retain_ratio": ratio} if ratio != 0.1 else {}
        got = rkv_scores(queries, keys, 4, retain_direction="first_percent", **kwargs)
        torch.testing.assert_close(got[0].double(), torch.tensor(ref, dtype=torch.float64), atol=1e-7, rtol=1e-5)
    # one cluster: the ratio matters (at 0.1 "first_percent" spares the second similar column, at 1.0 the last)
    assert not torch.allclose(rkv_scores(queries, keys, 4, retain_direction="first_percent"),
                              rkv_scores(queries, keys, 4, retain_direction="last_percent"), atol=1e-7, rtol=0)


# --- construction ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("params", "message"), [
    ({"window_size": 0}, "window_size must be a positive integer"),
    ({"window_size": 2.5}, "window_size must be a positive integer"),
    ({"kernel_size": True}, "kernel_size must be a positive integer"),
    ({"initial_non_compressible_length": -1}, "initial_non_compressible_length must be an integer >= 0"),
    ({"initial_non_compressible_length": 1.5}, "initial_non_compressible_length must be an integer >= 0"),
    ({"budget": 10, "window_size": 8, "initial_non_compressible_length": 4}, r"must exceed window_size"),
    ({"mix_lambda": 1.5}, r"mix_lambda must be in \[0, 1\]"),
    ({"mix_lambda": -0.1}, r"mix_lambda must be in \[0, 1\]"),
    ({"retain_ratio": 0.0}, r"retain_ratio must be in \(0, 1\]"),
    ({"retain_ratio": 1.5}, r"retain_ratio must be in \(0, 1\]"),
    ({"rotation_offset": -1}, "rotation_offset must be an integer >= 0"),
    ({"rotation_offset": 1.5}, "rotation_offset must be an integer >= 0"),
])
def test_invalid_parameters_name_the_parameter_and_range(params, message):
    with pytest.raises(PressParameterError, match=message):
        RKVPress(**params)


def test_edge_values_are_accepted():
    for params in ({"mix_lambda": 0.0}, {"mix_lambda": 1.0}, {"retain_ratio": 1.0}, {"rotation_offset": 0},
                   {"budget": 13, "window_size": 8, "initial_non_compressible_length": 4}):
        press = RKVPress(**params)
        assert all(getattr(press, k) == v for k, v in params.items())


@pytest.mark.parametrize(("ratio", "context", "params", "budget"), [
    (0.5, 100, {}, 50),
    (0.75, 100, {"window_size": 4}, 25),
    (0.99, 100, {}, 9),  # at least the window (default 8) plus one token
    (0.99, 100, {"window_size": 4, "initial_non_compressible_length": 3}, 8),
    (0.99, 100, {"initial_non_compressible_length": 2}, 11),
])
def test_from_compression_ratio(ratio, context, params, budget):
    press = RKVPress.from_compression_ratio(ratio, context, **params)
    assert press.budget == budget
    assert all(getattr(press, k) == v for k, v in params.items())


def test_calling_the_press_applies_it():
    model = tiny_model("llama")
    ids = torch.randint(4, 120, (1, 30), generator=torch.Generator().manual_seed(9))
    runs = []
    for use_call in (True, False):
        press = RKVPress(budget=12, window_size=4, compression_interval=2)
        cache = DynamicCache()
        with (press(model) if use_call else apply_press(press, model)), torch.no_grad():
            out = model(input_ids=ids, past_key_values=cache)
        runs.append((cache.get_seq_length(), out.logits))
    assert runs[0][0] == runs[1][0] == 12
    assert torch.equal(runs[0][1], runs[1][1])


# --- when to compress: the edges of the "interval" schedule --------------------------------------------------------
def test_exactly_budget_tokens_are_not_compressed_and_two_tokens_over_it_are():
    """A forward that leaves exactly ``budget`` tokens keeps them where they are (with rotation and an offset a
    compression would have moved them); a forward of two tokens that leaves budget + 1 compresses at once."""
    model = tiny_model("llama")
    budget = 12
    press = RKVPress(budget=budget, window_size=4, compression_interval=8, rotate_keys=True, rotation_offset=5)
    ids = torch.randint(4, 120, (1, budget + 2), generator=torch.Generator().manual_seed(10))
    cache = DynamicCache()
    with apply_press(press, model), torch.no_grad():
        model(input_ids=ids[:, :budget], past_key_values=cache)
        assert cache.get_seq_length() == budget and next_position(cache) == budget
        assert rkv_slot_positions(cache, 0)[1][0, 0].tolist() == list(range(budget))
        model(input_ids=ids[:, budget:], past_key_values=cache)
    assert cache.get_seq_length() == budget
    assert next_position(cache) == 5 + budget


# --- a cache filled elsewhere ------------------------------------------------------------------------------------
def test_cache_loaded_from_disk_is_taken_as_contiguous_slots(tmp_path):
    """A compressed (and rotated) cache saved and loaded again has no record of its slots: the press takes them as
    the last tokens seen, at the positions just below the next one, and goes on from there."""
    model = tiny_model("llama")
    press = RKVPress(budget=12, window_size=4, compression_interval=4, rotate_keys=True, rotation_offset=3)
    cache = DynamicCache()
    ids = torch.randint(4, 120, (1, 20), generator=torch.Generator().manual_seed(11))
    with apply_press(press, model), torch.no_grad():
        model(input_ids=ids, past_key_values=cache)
        model(input_ids=ids[:, :1], past_key_values=cache)
    save_cache(cache, tmp_path / "c", model=model)
    loaded, _ = load_cache(tmp_path / "c", model=model)
    seen, nxt, length = position_state(loaded).seen_tokens, next_position(loaded), loaded.get_seq_length()
    assert (seen, nxt, length) == (21, 3 + 12 + 1, 13)  # compressed and rotated: all three differ
    with apply_press(press, model), torch.no_grad():
        model(input_ids=ids[:, 1:2], past_key_values=loaded)
    for layer in range(len(loaded)):
        orig, pos = rkv_slot_positions(loaded, layer)
        assert orig[0, 0].tolist() == list(range(seen - length, seen + 1))
        assert pos[0, 0].tolist() == list(range(nxt - length, nxt + 1))


# --- replay cases for the query buffer ---------------------------------------------------------------------------
@dataclass
class _DefaultDeviceElsewhere(RKVPress):
    """The press with torch's default device set elsewhere (``meta``) while its hook runs: every tensor it makes
    must follow the model's tensors, not the default device (e.g. a user's ``torch.set_default_device``)."""

    def forward_hook(self, *args, **kwargs):
        with torch.device("meta"):
            return super().forward_hook(*args, **kwargs)


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


def test_each_batch_row_keeps_what_it_keeps_alone():
    """Scores are per batch element: a batch of two prompts keeps, row by row, the tokens and positions each
    prompt keeps when decoded alone, with the same logits (float32 tolerance)."""
    model = tiny_model("llama")
    press = RKVPress(budget=12, window_size=4, compression_interval=2, initial_non_compressible_length=1,
                     rotate_keys=True, rotation_offset=2)
    ids = torch.randint(4, 120, (2, 20), generator=torch.Generator().manual_seed(13))
    steps = torch.randint(4, 120, (2, 8), generator=torch.Generator().manual_seed(14))  # fed, not generated

    def run(rows):
        cache, logits = DynamicCache(), []
        with apply_press(press, model), torch.no_grad():
            logits.append(model(input_ids=ids[rows], past_key_values=cache).logits[:, -1])
            for t in range(steps.shape[1]):
                logits.append(model(input_ids=steps[rows, t:t + 1], past_key_values=cache).logits[:, -1])
        return cache, torch.stack(logits, dim=1)

    both, both_logits = run([0, 1])
    assert both.get_seq_length() < 28  # compressed
    for row in (0, 1):
        alone, alone_logits = run([row])
        for layer in range(len(both)):
            orig_b, pos_b = rkv_slot_positions(both, layer)
            orig_a, pos_a = rkv_slot_positions(alone, layer)
            assert torch.equal(orig_b[row], orig_a[0]) and torch.equal(pos_b[row], pos_a[0])
            torch.testing.assert_close(both.layers[layer].keys[row], alone.layers[layer].keys[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(both_logits[row], alone_logits[0], atol=1e-4, rtol=1e-4)
