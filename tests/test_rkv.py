"""R-KV press: selection against a loop reference, cache bound, survivors, no-op budget, key rotation."""

import math

import pytest
import torch
from transformers import DynamicCache, pipeline

import kvpress_ext.pipeline  # noqa: F401  (registers the pipeline)
from kvpress_ext.adapters import get_adapter
from kvpress_ext.apply import apply_press
from kvpress_ext.errors import PressParameterError
from kvpress_ext.positions import position_state
from kvpress_ext.presses.rkv import RKVPress, rkv_scores, rkv_select, rkv_slot_positions
from kvpress_ext.registry import get_press
from kvpress_ext.testing import tiny_model, tiny_tokenizer


# --- literal reference of the paper's formula (loops over tokens) ---------------------------------
def reference_scores(queries, keys, window, kernel, lam, direction):
    b, hq, w, d = queries.shape
    _, h, n, _ = keys.shape
    g = hq // h
    cand = n - window
    out = torch.zeros(b, h, cand, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            k = keys[bi, hi].double()
            # importance
            attn = torch.zeros(cand, dtype=torch.float64)
            for i in range(w):
                logits = []
                for j in range(cand):
                    logits.append(max(float(queries[bi, hi * g + gg, i].double() @ k[j]) for gg in range(g)) / math.sqrt(d))
                m = max(logits)
                ex = [math.exp(x - m) for x in logits]
                s = sum(ex)
                for j in range(cand):
                    attn[j] += ex[j] / s / w
            pooled = torch.zeros(cand, dtype=torch.float64)
            for j in range(cand):
                lo, hi_ = max(0, j - kernel // 2), min(cand, j + kernel // 2 + 1)
                pooled[j] = max(attn[lo:hi_])
            # redundancy
            sim = [[0.0] * n for _ in range(n)]
            for i in range(n):
                for j in range(n):
                    if i != j:
                        sim[i][j] = float(k[i] @ k[j] / ((k[i].norm() + 1e-8) * (k[j].norm() + 1e-8)))
            for i in range(n):
                similar = [j for j in range(n) if sim[i][j] > 0.5]
                if similar:
                    j = similar[-1] if direction == "last" else similar[0]
                    sim[i][j] = 0.0
            means = [sum(row) / n for row in sim]
            m = max(means)
            ex = [math.exp(x - m) for x in means]
            red = [x / sum(ex) for x in ex]
            for j in range(cand):
                out[bi, hi, j] = lam * pooled[j] - (1 - lam) * red[j]
    return out


def _random_qk(seed, n=40, d=8, h=2, g=2, w=4):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, h, n, d, generator=gen)
    # near-duplicates so the "spare one similar key" rule matters
    keys[:, :, 10:20] = keys[:, :, 0:10] + 0.3 * torch.randn(1, h, 10, d, generator=gen)
    queries = torch.randn(1, h * g, w, d, generator=gen)
    return queries, keys


@pytest.mark.parametrize("direction", ["last", "first"])
@pytest.mark.parametrize("seed", [0, 1])
def test_scores_and_selection_match_loop_reference(direction, seed):
    queries, keys = _random_qk(seed)
    window, kernel, lam, budget, prefix = 4, 5, 0.3, 20, 2
    ours = rkv_scores(queries, keys, window, kernel_size=kernel, mix_lambda=lam, retain_direction=direction)
    ref = reference_scores(queries, keys, window, kernel, lam, direction)
    torch.testing.assert_close(ours.double(), ref, atol=1e-6, rtol=1e-5)
    keep = rkv_select(queries, keys, budget, window, prefix, kernel_size=kernel, mix_lambda=lam,
                      retain_direction=direction)
    for hi in range(keys.shape[1]):
        top = ref[0, hi, prefix:].topk(budget - window - prefix).indices + prefix
        expected = sorted(top.tolist() + list(range(prefix)) + list(range(36, 40)))
        assert keep[0, hi].tolist() == expected


def test_invalid_parameters_are_rejected():
    with pytest.raises(PressParameterError, match="budget"):
        get_press("rkv", budget=8, window_size=8)
    with pytest.raises(PressParameterError, match="retain_direction"):
        RKVPress(retain_direction="middle")


# --- on models ---------------------------------------------------------------------------------------
def _decode(model, press, ids, steps, on_step=None):
    cache = DynamicCache()
    logits = []
    with apply_press(press, model):
        out = model(input_ids=ids, past_key_values=cache)
        for _ in range(steps):
            logits.append(out.logits[:, -1])
            if on_step:
                on_step(cache)
            tok = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=tok, past_key_values=cache)
        logits.append(out.logits[:, -1])
    return cache, torch.cat(logits)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt_neox"])
def test_cache_bounded_and_prefix_window_survive_in_pipeline(arch):
    model = tiny_model(arch)
    budget, buffer, window, prefix = 16, 6, 3, 2
    press = RKVPress(budget=budget, window_size=window, compression_interval=buffer,
                     initial_non_compressible_length=prefix)
    lengths, violations = [], []

    def record(module, args, kwargs, output):
        cache = kwargs.get("past_key_values")
        n = cache.get_seq_length()
        lengths.append(n)
        seen = position_state(cache).seen_tokens
        for layer in range(len(cache)):
            orig, _ = rkv_slot_positions(cache, layer)
            for row in orig.reshape(-1, orig.shape[-1]).tolist():
                if row[:prefix] != list(range(prefix)) or row[-window:] != list(range(seen - window, seen)):
                    violations.append((layer, row))

    handle = get_adapter(model).decoder(model).register_forward_hook(record, with_kwargs=True)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tiny_tokenizer())
    pipe("the quick brown fox jumps over", question=" why?", press=press, max_new_tokens=30)
    handle.remove()
    assert len(lengths) >= 30
    assert max(lengths) <= budget + buffer
    assert min(lengths[1:]) >= budget  # compressed down to the budget, never below
    assert not violations


@pytest.mark.parametrize("arch", ["gpt_neox"])
def test_budget_larger_than_sequence_equals_no_compression(arch):
    model = tiny_model(arch)
    ids = torch.randint(4, 120, (1, 30), generator=torch.Generator().manual_seed(0))
    _, ref = _decode(model, None, ids, 8)
    _, ours = _decode(model, RKVPress(budget=200, window_size=4, compression_interval=8), ids, 8)
    assert torch.equal(ref, ours)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt_neox"])
def test_rotated_keys_equal_keys_at_new_positions(arch):
    offset = 5 if arch == "qwen3" else 0
    model = tiny_model(arch)
    adapter = get_adapter(model)
    attn0 = adapter.attention_modules(model)[0]
    prefix = 2
    press = RKVPress(budget=20, window_size=4, compression_interval=4, initial_non_compressible_length=prefix,
                     rotate_keys=True, rotation_offset=offset)
    ids = torch.randint(4, 120, (1, 30), generator=torch.Generator().manual_seed(1))
    captured = []
    handle = attn0.register_forward_pre_hook(
        lambda m, a, k: captured.append((k.get("hidden_states", a[0] if a else None)).detach()), with_kwargs=True
    )
    cache, _ = _decode(model, press, ids, 8)
    handle.remove()
    hidden = torch.cat(captured, dim=1)  # layer-0 attention inputs do not depend on the cache
    assert hidden.shape[1] == 30 + 8
    orig, pos = rkv_slot_positions(cache, 0)
    n = cache.get_seq_length()
    expected_pos = list(range(prefix)) + list(range(prefix + offset, prefix + offset + n - prefix))
    assert pos[0, 0].tolist() == expected_pos
    assert position_state(cache).next_position == prefix + offset + n - prefix
    with torch.no_grad():
        pre = adapter.prerope_keys(attn0, hidden)  # (1, H, T, d)
    idx = orig.unsqueeze(-1).expand(-1, -1, -1, pre.shape[-1])
    expected = adapter.apply_rope(model, pre.gather(2, idx), pos)
    torch.testing.assert_close(cache.layers[0].keys, expected, atol=1e-5, rtol=1e-5)


def test_rotation_changes_next_position_only_when_enabled():
    model = tiny_model("llama")
    ids = torch.randint(4, 120, (1, 30), generator=torch.Generator().manual_seed(2))
    plain, _ = _decode(model, RKVPress(budget=16, window_size=4, compression_interval=4), ids, 5)
    assert position_state(plain).next_position == 35 and not position_state(plain).rotated
    rotated, _ = _decode(model, RKVPress(budget=16, window_size=4, compression_interval=4, rotate_keys=True), ids, 5)
    assert position_state(rotated).next_position == rotated.get_seq_length()


@pytest.mark.parametrize("direction", ["last_percent", "first_percent"])
def test_percent_directions_spare_the_rank_th_similar_key(direction):
    from kvpress_ext.presses.rkv import rkv_redundancy

    _, keys = _random_qk(3, n=30)
    ratio = 0.1
    ours = rkv_redundancy(keys, direction, ratio)
    k = keys[0, 0].double()
    n = k.shape[0]
    kn = k / (k.norm(dim=-1, keepdim=True) + 1e-8)
    sim = kn @ kn.T
    sim.fill_diagonal_(0.0)
    rank = max(1, int(n * ratio))
    for i in range(n):
        similar = [j for j in range(n) if sim[i, j] > 0.5]
        if similar:
            r = min(rank, len(similar))
            sim[i, similar[-r] if direction == "last_percent" else similar[r - 1]] = 0.0
    torch.testing.assert_close(ours[0, 0].double(), sim.mean(-1).softmax(-1), atol=1e-6, rtol=1e-5)
