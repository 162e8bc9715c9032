"""The R-KV press on models: cache bound, survivors (prefix and window), no-op budget, key rotation, the
compression cadence and its edges, every parameter reaching the selection, a cache loaded from disk, batches."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, pipeline

import kvpress_ext.runtime.pipeline  # noqa: F401  (registers the pipeline)
from kvpress_ext.core.adapters import get_adapter
from kvpress_ext.core.apply import apply_press
from kvpress_ext.core.positions import next_position, position_state
from kvpress_ext.presses.rkv import RKVPress, rkv_select, rkv_slot_positions
from kvpress_ext.storage.cache_files import load_cache, save_cache
from kvpress_ext.testing import attention_inputs, tiny_model, tiny_tokenizer


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
    with attention_inputs(model, layers=[0]) as captured:
        cache, _ = _decode(model, press, ids, 8)
    hidden = torch.cat(captured[0], dim=1)  # layer-0 attention inputs do not depend on the cache
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


def expected_lengths(schedule, budget, interval, chunks):
    """Cache length after each forward of ``chunks`` tokens, from the schedules' descriptions.

    interval: a forward of several tokens compresses when the cache exceeds the budget, one token when it
    reaches budget + interval. published: a forward compresses when the tokens fed before it are a multiple
    of the interval (0 included) and the cache exceeds the budget (a cache of exactly budget is unchanged).
    """
    lengths, cache, seen = [], 0, 0
    for n in chunks:
        cache += n
        if schedule == "interval":
            compress = cache > budget and (n > 1 or cache >= budget + interval)
        else:
            compress = seen % interval == 0 and cache > budget
        if compress:
            cache = budget
        seen += n
        lengths.append(cache)
    return lengths


DECODE = [13] + [1] * 40  # prefill 13 tokens, then decode one token per forward
MIXED = [20, 5] + [1] * 30 + [3, 1, 1, 1, 1, 1]  # prefill over budget, a multi-token question, a chunk


@pytest.mark.slow
@pytest.mark.parametrize(("schedule", "chunks", "starts"), [
    # tokens fed before each compressing forward, worked out by hand for budget 16, interval 8:
    ("interval", DECODE, [23, 31, 39, 47]),  # the cache reaches 16 + 8 = 24 at the forward after 23 tokens
    ("published", DECODE, [16, 24, 32, 40, 48]),  # multiples of 8 once the cache exceeds 16
    ("interval", MIXED, None),
    ("published", MIXED, None),
])
@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_exact_compression_cadence(schedule, chunks, starts, arch):
    model = tiny_model(arch)
    budget, interval = 16, 8
    press = RKVPress(budget=budget, window_size=4, compression_interval=interval, schedule=schedule)
    ids = torch.randint(4, 120, (1, sum(chunks)), generator=torch.Generator().manual_seed(4))
    cache, lengths, start, compressed_at = DynamicCache(), [], 0, []
    with apply_press(press, model), torch.no_grad():
        for n in chunks:
            before = cache.get_seq_length()
            model(input_ids=ids[:, start:start + n], past_key_values=cache)
            per_layer = {cache.get_seq_length(i) for i in range(len(cache))}
            assert len(per_layer) == 1  # every layer compresses in the same forward
            lengths.append(per_layer.pop())
            if lengths[-1] < before + n:
                compressed_at.append(start)
            start += n
    assert lengths == expected_lengths(schedule, budget, interval, chunks)
    if starts is not None:
        assert compressed_at == starts


# --- what the press hands rkv_select: every press parameter reaches the selection ---------------------------------
def _compressions(model, press, prompt_len=8, steps=24, seed=5):
    """For every compression of layer 0 while decoding: the cache's keys, the window's scoring queries (rebuilt from
    that layer's inputs with RoPE at their keys' positions) and the tokens the press kept."""
    adapter = get_adapter(model)
    attn0 = adapter.attention_modules(model)[0]
    w, budget = press.window_size, press.budget
    before, after = [], []

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

    handles = [attn0.register_forward_hook(pre_press, with_kwargs=True)]
    ids = torch.randint(4, 120, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
    cache = DynamicCache()
    try:
        with apply_press(press, model), torch.no_grad(), attention_inputs(model, layers=[0]) as captured:
            handles.append(attn0.register_forward_hook(post_press, with_kwargs=True))
            out = model(input_ids=ids, past_key_values=cache)
            for _ in range(steps):
                out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache)
    finally:
        for h in handles:
            h.remove()
    hidden = torch.cat(captured[0], dim=1)
    assert len(before) == len(after)
    result = []
    for (keys, orig, pos), kept in zip(before, after):
        with torch.no_grad():
            q = adapter.prerope_queries(attn0, hidden[:, orig[0, 0, -w:]])
        result.append((keys, adapter.apply_rope(model, q, pos[0, 0, -w:]), orig, kept))
    return result


@pytest.mark.parametrize(("arch", "rotate"), [("llama", False), ("llama", True), ("qwen3", True)])
def test_press_keeps_what_rkv_select_keeps_for_the_real_window_queries(arch, rotate):
    """In a model, every compression of layer 0 keeps the tokens rkv_select picks from the cache's keys and
    the last window's queries, computed here from that layer's inputs with RoPE at their keys' positions."""
    # interval 3 < window 4: queries from before a compression are reused
    press = RKVPress(budget=12, window_size=4, compression_interval=3, kernel_size=3, mix_lambda=0.5,
                     rotate_keys=rotate)
    records = _compressions(tiny_model(arch), press)
    assert len(records) >= 3
    for keys, q, orig, kept in records:
        keep = rkv_select(q, keys, 12, 4, kernel_size=3, mix_lambda=0.5)
        assert torch.equal(orig.gather(2, keep), kept)


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
