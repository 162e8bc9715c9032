"""R-KV press: selection against an independent loop reference, compression cadence, cache bound,
survivors, no-op budget, key rotation."""

import math
import operator

import pytest
import torch
from transformers import DynamicCache, pipeline

import kvpress_ext.runtime.pipeline  # noqa: F401  (registers the pipeline)
from kvpress_ext.core.adapters import get_adapter
from kvpress_ext.core.apply import apply_press
from kvpress_ext.core.errors import PressParameterError
from kvpress_ext.core.positions import position_state
from kvpress_ext.core.registry import get_press
from kvpress_ext.presses.rkv import RKVPress, rkv_redundancy, rkv_scores, rkv_select, rkv_slot_positions
from kvpress_ext.testing import attention_inputs, tiny_model, tiny_tokenizer


# --- independent reference: R-KV's published algorithm as per-element loops ----------------------------
# Written from the algorithm's description, not from rkv.py: for each KV head, cosine similarity S of the
# keys with S[i][i] = 0; every row i retains one index r_i (the last / first column j with S[i][j] > 0.5,
# 0 when there is none; "*_percent": the k-th entry of the sorted row of "j if similar else 0"), sets
# S[i][r_i] = 0; redundancy of key j = softmax over j of (1/L) sum_i S[i][j]. Importance: attention of the
# window queries (max over the query group, softmax over the keys before the window, mean over queries),
# max-pooled over kernel_size neighbours. Score = lam * importance - (1 - lam) * redundancy.
def _dot(a, b):
    return sum(map(operator.mul, a, b))


def _softmax(xs):
    m = max(xs)
    ex = [math.exp(x - m) for x in xs]
    s = sum(ex)
    return [e / s for e in ex]


def reference_similarity(k):
    """Cosine similarity (list of lists) of the rows of ``k`` (list of vectors), diagonal 0."""
    norms = [math.sqrt(_dot(v, v)) + 1e-8 for v in k]
    n = len(k)
    return [[0.0 if i == j else _dot(k[i], k[j]) / (norms[i] * norms[j]) for j in range(n)] for i in range(n)]


def reference_redundancy(sim, direction, ratio=0.1, threshold=0.5):
    n = len(sim)
    sim = [row[:] for row in sim]
    for i in range(n):
        similar = [j for j in range(n) if sim[i][j] > threshold]
        if direction == "last":
            r = similar[-1] if similar else 0
        elif direction == "first":
            r = similar[0] if similar else 0
        else:
            encoded = sorted(j if sim[i][j] > threshold else 0 for j in range(n))
            k = max(1, int(n * ratio))
            r = encoded[-k:][-1] if direction == "last_percent" else encoded[:k][-1]
        sim[i][r] = 0.0
    column_means = [sum(sim[i][j] for i in range(n)) / n for j in range(n)]
    return _softmax(column_means)


def reference_importance(queries, k, window, kernel):
    """queries: the query group's window queries, list (group) of lists (window) of vectors."""
    d = len(k[0])
    cand = len(k) - window
    attn = [0.0] * cand
    for t in range(len(queries[0])):
        logits = [max(_dot(group[t], k[j]) for group in queries) / math.sqrt(d) for j in range(cand)]
        for j, p in enumerate(_softmax(logits)):
            attn[j] += p / len(queries[0])
    return [max(attn[max(0, j - kernel // 2): j + kernel // 2 + 1]) for j in range(cand)]


def reference_kept(queries, keys, budget, window, kernel, lam, direction, prefix=0, ratio=0.1):
    """Per (batch, KV head): the kept cache indices (sorted) and the scores before the window."""
    b, hq, _, _ = queries.shape
    h, n = keys.shape[1], keys.shape[2]
    g = hq // h
    kept, scores = [], []
    for bi in range(b):
        for hi in range(h):
            k = keys[bi, hi].double().tolist()
            q = [queries[bi, hi * g + gg].double().tolist() for gg in range(g)]
            imp = reference_importance(q, k, window, kernel)
            red = reference_redundancy(reference_similarity(k), direction, ratio)
            score = [lam * imp[j] - (1 - lam) * red[j] for j in range(n - window)]
            order = sorted(range(prefix, n - window), key=lambda j: -score[j])[: budget - window - prefix]
            kept.append(sorted(order + list(range(prefix)) + list(range(n - window, n))))
            scores.append(score)
    return kept, scores


def clustered_qk(seed, n=300, clusters=20, kv_heads=4, q_heads=8, d=64, window=8, singles=0.15, noise=0.5):
    """Keys made of near-duplicates of ``clusters`` directions (plus a share ``singles`` of lone keys that
    are similar to nothing), GQA queries."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(kv_heads, clusters, d, generator=gen)
    member = torch.randint(0, clusters, (kv_heads, n), generator=gen)
    keys = centers.gather(1, member.unsqueeze(-1).expand(-1, -1, d)) + noise * torch.randn(kv_heads, n, d, generator=gen)
    lone = torch.rand(kv_heads, n, generator=gen) < singles
    keys = torch.where(lone.unsqueeze(-1), 2 * torch.randn(kv_heads, n, d, generator=gen), keys)
    queries = torch.randn(1, q_heads, window, d, generator=gen)
    return queries, keys.unsqueeze(0)


@pytest.fixture(scope="module")
def clustered():
    return clustered_qk(0)


@pytest.mark.parametrize("direction", ["last", "first"])
@pytest.mark.parametrize("budget", [64, 128])
def test_kept_sets_equal_loop_reference_on_clustered_keys(clustered, direction, budget):
    queries, keys = clustered
    window, kernel, lam = 8, 7, 0.07
    # the reference must see both kinds of rows: with similar keys and without any
    sim0 = reference_similarity(keys[0, 0].double().tolist())
    has_similar = [any(x > 0.5 for x in row) for row in sim0]
    assert 0 < sum(has_similar) < len(has_similar)
    kept, ref_scores = reference_kept(queries, keys, budget, window, kernel, lam, direction)
    ours = rkv_scores(queries, keys, window, kernel_size=kernel, mix_lambda=lam, retain_direction=direction)
    torch.testing.assert_close(ours[0].double(), torch.tensor(ref_scores, dtype=torch.float64), atol=1e-7, rtol=1e-5)
    keep = rkv_select(queries, keys, budget, window, kernel_size=kernel, mix_lambda=lam, retain_direction=direction)
    assert keep[0].tolist() == kept


@pytest.mark.parametrize("direction", ["last", "first", "last_percent", "first_percent"])
@pytest.mark.parametrize("ratio", [0.1, 0.9])
def test_redundancy_equals_loop_reference_all_directions(direction, ratio):
    # tight clusters on few keys: some rows have more similar keys than zeros, so "first_percent" varies
    _, keys = clustered_qk(1, n=60, clusters=3, kv_heads=2, d=16, noise=0.2, singles=0.1)
    ours = rkv_redundancy(keys, direction, ratio)
    for hi in range(keys.shape[1]):
        ref = reference_redundancy(reference_similarity(keys[0, hi].double().tolist()), direction, ratio)
        torch.testing.assert_close(ours[0, hi].double(), torch.tensor(ref, dtype=torch.float64), atol=1e-7, rtol=1e-5)


def test_published_last_percent_equals_last():
    _, keys = clustered_qk(2, n=80, clusters=4, kv_heads=2, d=16)
    assert torch.equal(rkv_redundancy(keys, "last_percent", 0.3), rkv_redundancy(keys, "last"))


@pytest.mark.parametrize("direction", ["last", "first"])
def test_selection_with_prefix_and_batch_matches_loop_reference(direction):
    queries, keys = clustered_qk(3, n=60, clusters=6, kv_heads=2, q_heads=4, d=16, window=4)
    queries, keys = torch.cat([queries, queries.flip(2)]), torch.cat([keys, keys.flip(2)])  # batch of 2
    kept, _ = reference_kept(queries, keys, 24, 4, 5, 0.3, direction, prefix=2)
    keep = rkv_select(queries, keys, 24, 4, 2, kernel_size=5, mix_lambda=0.3, retain_direction=direction)
    assert keep.reshape(-1, 24).tolist() == kept


def test_invalid_parameters_are_rejected():
    with pytest.raises(PressParameterError, match="budget"):
        get_press("rkv", budget=8, window_size=8)
    with pytest.raises(PressParameterError, match="retain_direction"):
        RKVPress(retain_direction="middle")
    with pytest.raises(PressParameterError, match="schedule"):
        RKVPress(schedule="sometimes")


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


@pytest.mark.parametrize(("arch", "rotate"), [("llama", False), ("llama", True), ("qwen3", True)])
def test_press_keeps_what_rkv_select_keeps_for_the_real_window_queries(arch, rotate):
    """In a model, every compression of layer 0 keeps the tokens rkv_select picks from the cache's keys and
    the last window's queries, computed here from that layer's inputs with RoPE at their keys' positions."""
    model = tiny_model(arch)
    adapter = get_adapter(model)
    attn0 = adapter.attention_modules(model)[0]
    budget, window, interval = 12, 4, 3  # interval < window: queries from before a compression are reused
    press = RKVPress(budget=budget, window_size=window, compression_interval=interval, kernel_size=3,
                     mix_lambda=0.5, rotate_keys=rotate)
    before, after = [], []

    def pre_press(module, args, kwargs, output):  # registered first: runs before the press's hook
        cache = kwargs["past_key_values"]
        n = cache.layers[0].keys.shape[-2]
        if n >= budget + interval:
            orig, pos = rkv_slot_positions(cache, 0)
            state = position_state(cache)
            orig = torch.cat([orig, torch.full_like(orig[..., :1], state.seen_tokens - 1)], dim=-1)
            pos = torch.cat([pos, torch.full_like(pos[..., :1], state.next_position - 1)], dim=-1)
            before.append((cache.layers[0].keys.clone(), orig, pos))

    def post_press(module, args, kwargs, output):
        if len(after) < len(before):
            after.append(rkv_slot_positions(kwargs["past_key_values"], 0)[0].clone())

    handles = [attn0.register_forward_hook(pre_press, with_kwargs=True)]
    cache = DynamicCache()
    ids = torch.randint(4, 120, (1, 8), generator=torch.Generator().manual_seed(5))
    with apply_press(press, model), torch.no_grad(), attention_inputs(model, layers=[0]) as captured:
        handles.append(attn0.register_forward_hook(post_press, with_kwargs=True))
        out = model(input_ids=ids, past_key_values=cache)
        for _ in range(24):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache)
    for h in handles:
        h.remove()
    hidden = torch.cat(captured[0], dim=1)
    assert len(before) == len(after) >= 3
    for (keys, orig, pos), kept in zip(before, after):
        last = orig[0, 0, -window:]
        with torch.no_grad():
            q = adapter.prerope_queries(attn0, hidden[:, last])
        q = adapter.apply_rope(model, q, pos[0, 0, -window:])
        keep = rkv_select(q, keys, budget, window, kernel_size=3, mix_lambda=0.5)
        assert torch.equal(orig.gather(2, keep), kept)
