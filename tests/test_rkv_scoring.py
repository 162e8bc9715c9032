"""R-KV's scoring and selection (presses/rkv.py) against an independent loop reference of the published
algorithm: redundancy in every retain direction, importance, the kept sets, any leading shape, defaults and edge
values; and the press's parameter checks and ``from_compression_ratio``."""

import importlib.util
import math
import operator
import sys
from pathlib import Path

import pytest
import torch

from kvpress_ext.core.errors import PressParameterError
from kvpress_ext.core.registry import get_press
from kvpress_ext.presses.rkv import (
    RKVPress,
    _redundancy_by_blocks,
    retained_index,
    rkv_redundancy,
    rkv_scores,
    rkv_select,
)

REPO = Path(__file__).resolve().parents[1]


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


@pytest.mark.slow
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


# --- the scoring functions: any leading shape, defaults, edge values ---------------------------------------------
def _reference_retained(row, direction, ratio):
    """Loop reference of the retained column of one mask row (see reference_redundancy above)."""
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


@pytest.mark.parametrize("block", [1, 3, 16, 128])
def test_redundancy_scanned_in_blocks_equals_the_loop_reference(block):
    """The similar column is looked for a block of columns at a time, then only for the rows still looking:
    any first block width (widths double after it, the last one cut at the end of the keys) gives the same
    redundancy, in both scan directions, with lone keys (similar to nothing) that reach the far end."""
    _, keys = clustered_qk(2, n=90, clusters=6, kv_heads=3, d=16, noise=0.4, singles=0.3)
    unit = keys.float() / (keys.float().norm(dim=-1, keepdim=True) + 1e-8)
    for direction in ("last", "first"):
        got = _redundancy_by_blocks(unit, direction == "first", 0.5, block)
        torch.testing.assert_close(got.double(), _reference_redundancy(keys, direction), atol=1e-7, rtol=1e-5)


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


# --- the upstream-style reference of benchmarks/rkv_scoring.py: what the quoted speed-up is measured against ------
@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("rkv_scoring_bench", REPO / "benchmarks" / "rkv_scoring.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.mark.parametrize("keys_kind", ["clustered", "random"])
def test_upstream_style_reference_gives_our_scores_and_kept_tokens(bench, keys_kind):
    """Scores within 1e-7 absolute (+ 1e-5 relative; both float32, scores ~1 / L), and the same kept tokens at the
    same budget: clustered keys (rows with and without a similar key) and the benchmark's random keys."""
    window, kernel, lam, budget = 8, 7, 0.07, 72
    if keys_kind == "clustered":
        queries, keys = clustered_qk(5, n=240, clusters=12, kv_heads=2, q_heads=4, d=32)
        unit = torch.nn.functional.normalize(keys[0, 0], dim=-1)
        has_similar = ((unit @ unit.T).fill_diagonal_(0) > 0.5).any(dim=-1)
        assert 0 < int(has_similar.sum()) < len(has_similar)  # both kinds of rows: a similar key spared, or column 0
    else:
        gen = torch.Generator().manual_seed(6)
        keys, queries = torch.randn(1, 2, 240, 32, generator=gen), torch.randn(1, 4, window, 32, generator=gen)
    theirs = bench.upstream_style_scores(queries, keys, window, kernel, lam)
    ours = rkv_scores(queries, keys, window, kernel_size=kernel, mix_lambda=lam)
    torch.testing.assert_close(ours, theirs, atol=1e-7, rtol=1e-5)
    # the kept set does not hang on a near tie: the scores on both sides of the budget's cut are further apart
    # than the two sides' scores are from each other
    ranked = theirs.sort(dim=-1, descending=True).values
    gap = (ranked[..., budget - window - 1] - ranked[..., budget - window]).min()
    assert gap > 2 * (ours - theirs).abs().max()
    kept = bench.upstream_style_kept(theirs, budget, window)
    assert torch.equal(rkv_select(queries, keys, budget, window, kernel_size=kernel, mix_lambda=lam), kept)
    assert bench.kept_overlap(kept, kept) == 1.0
    # the comparison sees a change of the mixing: another lambda keeps other tokens
    other = bench.upstream_style_kept(bench.upstream_style_scores(queries, keys, window, kernel, 0.5), budget, window)
    assert bench.kept_overlap(other, kept) < 0.95
