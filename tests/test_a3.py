"""A3 / CacheBlend fusion: exactness at rate 1, re-aligned concatenation at rate 0, selection rules,
the chunk store (reuse, corruption, mismatch), the masked attention backends and the pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DynamicCache

from kvpress_ext.core.errors import CacheFormatError, PressParameterError
from kvpress_ext.core.registry import get_press
from kvpress_ext.presses.a3 import A3Press, ChunkStore, realign
from kvpress_ext.presses.a3 import attention as A
from kvpress_ext.presses.a3 import selection as S
from kvpress_ext.testing import ARCHITECTURES, FlashinferStandIn, flatten, random_chunks, tiny_model, tiny_tokenizer

TOL = 1e-4  # float32 logits, tiny models


pytestmark = pytest.mark.usefixtures("one_thread")


def _full_logits(model, ids, q_len):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -q_len:]


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("strategy", ["blend", "debug", "random"])
def test_rate_one_equals_full_prefill(arch, strategy, tmp_path):
    model = tiny_model(arch, layers=3)
    chunks, q = random_chunks()
    store = ChunkStore(tmp_path, model)
    cache, logits = A3Press(strategy=strategy, rate=1.0, store=store).fuse(model, chunks, q)
    ref = _full_logits(model, [1] + flatten(chunks) + q, len(q))
    assert (logits - ref).abs().max() < TOL
    # the cache continues like the full prefill's
    full_cache = DynamicCache()
    with torch.no_grad():
        model(torch.tensor([[1] + flatten(chunks) + q]), past_key_values=full_cache)
        nxt = torch.tensor([[5]])
        a = model(nxt, past_key_values=cache).logits
        b = model(nxt, past_key_values=full_cache).logits
    assert (a - b).abs().max() < TOL


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt_neox"])
def test_rate_zero_full_equals_realigned_concatenation(arch, tmp_path):
    model = tiny_model(arch, layers=3)
    chunks, q = random_chunks(1)
    store = ChunkStore(tmp_path, model)
    _, logits = A3Press(strategy="full", rate=0.0, store=store).fuse(model, chunks, q)
    # manual reference: encode each chunk after BOS alone, re-rotate keys with RoPE from scratch, run the question
    ref_cache = DynamicCache()
    with torch.no_grad():
        bos_cache = DynamicCache()
        model(torch.tensor([[1]]), past_key_values=bos_cache)
        per_layer = [([bos_cache.layers[i].keys], [bos_cache.layers[i].values]) for i in range(3)]
        offset = 1
        from kvpress_ext.core.adapters import get_adapter
        from kvpress_ext.core.rope import rotate

        inv = get_adapter(model).inv_freq(model)
        for c in chunks:
            cc = DynamicCache()
            model(torch.tensor([[1] + c]), past_key_values=cc)
            for i in range(3):
                k = cc.layers[i].keys[:, :, 1:]
                delta = torch.full((len(c),), float(offset - 1))
                per_layer[i][0].append(rotate(k, delta, inv))
                per_layer[i][1].append(cc.layers[i].values[:, :, 1:])
            offset += len(c)
        for i, (ks, vs) in enumerate(per_layer):
            ref_cache.update(torch.cat(ks, -2), torch.cat(vs, -2), i)
        ref = model(torch.tensor([q]), past_key_values=ref_cache).logits[0]
    assert (logits - ref).abs().max() < TOL
    # and it is not the full prefill (cross-chunk attention is missing): the test can tell them apart
    assert (logits - _full_logits(model, [1] + flatten(chunks) + q, len(q))).abs().max() > 1e-3


def test_kl_falls_with_rate(tmp_path):
    model = tiny_model("llama", layers=4)
    chunks, q = random_chunks(2, lengths=(20, 20, 20), q_len=6)
    store = ChunkStore(tmp_path, model)
    ref = _full_logits(model, [1] + flatten(chunks) + q, len(q)).log_softmax(-1)
    errs = []
    for rate in (0.0, 0.5, 1.0):
        _, logits = A3Press(strategy="blend", rate=rate, store=store).fuse(model, chunks, q)
        errs.append(torch.nn.functional.kl_div(logits.log_softmax(-1), ref, log_target=True, reduction="sum").item())
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-6


def test_selection_counts_and_rules(tmp_path):
    model = tiny_model("llama", layers=3)
    chunks, q = random_chunks(3, lengths=(10, 10, 20))
    store = ChunkStore(tmp_path, model, save_surprisal=True)
    n_doc = 40
    r = A3Press(strategy="debug", rate=0.25, store=store).fuse_result(model, chunks, q)
    assert r.selected.numel() == 10 and r.selected.max() < n_doc
    assert A3Press(strategy="full", rate=0.5, store=store).fuse_result(model, chunks, q).selected.numel() == 0
    assert A3Press(strategy="cat", store=store).fuse_result(model, chunks, q).selected.tolist() == [n_doc - 1]
    assert A3Press(strategy="random", rate=0.0, store=store).fuse_result(model, chunks, q).selected.numel() == 1
    sel = A3Press(strategy="surprisal_chunk", rate=0.2, store=store).fuse_result(model, chunks, q).selected
    assert [int(((sel >= a) & (sel < b)).sum()) for a, b in ((0, 10), (10, 20), (20, 40))] == [2, 2, 4]
    sinks = [1 + 35, 1 + 40]  # a document token and the first question token (global indices)
    r = A3Press(strategy="attnlink", rate=0.1, store=store, sink_positions=sinks).fuse_result(model, chunks, q)
    assert 35 in r.selected.tolist() and r.selected.numel() == 4


def test_selection_helpers():
    assert S.largest_remainder([5, 3, 2], 5) == [3, 1, 1]  # quotas 2.5, 1.5, 1.0 -> ties to the first
    assert S.largest_remainder([1, 1, 1], 2) == [1, 1, 0]
    assert S.budget(0.0, 10) == 1 and S.budget(1.0, 10) == 10 and S.budget(0.15, 100) == 15
    pooled = S.avg_pool(torch.tensor([0.0, 0, 5, 0, 0, 0]), 5)
    assert torch.allclose(pooled, torch.tensor([5 / 3, 5 / 4, 1, 1, 5 / 4, 0]))
    assert S.top_k(torch.tensor([3.0, 1, 2, 0]), 2).tolist() == [0, 2]
    assert S.top_k(torch.tensor([3.0, 1, 2, 0]), 1, forced=torch.tensor([3])).tolist() == [3]


def test_parameter_errors(tmp_path):
    with pytest.raises(PressParameterError, match="sink_positions"):
        A3Press(strategy="attnlink")
    with pytest.raises(PressParameterError, match=r"\[0, 1\]"):
        A3Press(rate=1.5)
    with pytest.raises(PressParameterError, match="choose from"):
        A3Press(strategy="nope")
    assert isinstance(get_press("a3", strategy="debug"), A3Press)
    assert A3Press(strategy="blend").selection_layer == 1 and A3Press(strategy="random").selection_layer == 0
    model = tiny_model("llama", layers=2)
    chunks, q = random_chunks()
    with pytest.raises(PressParameterError, match="sink_positions must lie"):
        A3Press(strategy="attnlink", sink_positions=[0], store=ChunkStore(tmp_path, model)).fuse(model, chunks, q)


def test_surprisal_stored_and_mismatch_fails(tmp_path):
    model = tiny_model("llama", layers=2)
    chunks, q = random_chunks()
    store = ChunkStore(tmp_path, model, save_surprisal=True)
    entry = store.get(chunks[0])
    with torch.no_grad():
        logp = model(torch.tensor([[1] + chunks[0]])).logits[0].log_softmax(-1)
    ref = torch.cat([torch.zeros(1), -logp[1:-1].gather(-1, torch.tensor(chunks[0][1:])[:, None]).squeeze(-1)])
    assert torch.allclose(entry.surprisal, ref, atol=TOL)
    with pytest.raises(CacheFormatError, match="surprisal"):
        S.surprisal_chunk([entry.surprisal], [len(chunks[0]) + 1], 3)
    # a store without surprisal refuses the strategy instead of guessing
    plain = ChunkStore(tmp_path / "plain", model)
    with pytest.raises(CacheFormatError, match="save_surprisal"):
        plain.get(chunks[0]) and A3Press(strategy="surprisal_chunk", store=plain).fuse(model, chunks, q)


def test_store_reuse_corruption_and_mismatch(tmp_path):
    model = tiny_model("llama", layers=3)  # a layer after the selection layer reads stored K/V: the checks see them
    chunks, q = random_chunks()
    store = ChunkStore(tmp_path, model)
    store.precompute(chunks)
    assert store.misses == 4 and all(store.contains(c) for c in chunks)  # 3 chunks + the prefix
    _, first = A3Press(strategy="blend", store=store).fuse(model, chunks, q)
    again = ChunkStore(tmp_path, model)
    _, second = A3Press(strategy="blend", store=again).fuse(model, chunks, q)
    assert again.misses == 0 and again.hits == 4 and torch.equal(first, second)
    # a truncated tensor file
    path = store.chunk_path(chunks[1])
    data = (path / "tensors.safetensors").read_bytes()
    (path / "tensors.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheFormatError, match="corrupt"):
        ChunkStore(tmp_path, model).get(chunks[1])
    fixed = ChunkStore(tmp_path, model, recompute_bad=True)
    _, third = A3Press(strategy="blend", store=fixed).fuse(model, chunks, q)
    assert fixed.misses == 1 and (third - first).abs().max() < 1e-6
    # metadata that belongs to another chunk
    meta = json.loads((path / "metadata.json").read_text())
    meta["token_ids"] = meta["token_ids"][::-1]
    (path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(CacheFormatError, match="token ids"):
        ChunkStore(tmp_path, model).get(chunks[1])
    # another model with the same config uses another directory (weights are fingerprinted)
    other = ChunkStore(tmp_path, tiny_model("llama", layers=3, seed=1))
    assert other.directory != store.directory


def test_text_chunks_and_pipeline(tmp_path):
    from transformers import pipeline

    import kvpress_ext.runtime.pipeline  # noqa: F401 - registers the pipeline

    model, tok = tiny_model("llama", layers=2), tiny_tokenizer()
    texts = ["The cat sat. ", "A dog ran far away. "]
    press = A3Press(strategy="debug", rate=1.0, store=ChunkStore(tmp_path, model, tok))
    _, logits = press.fuse(model, texts, "Who ran?")
    ids = [1] + tok("".join(texts) + "Who ran?", add_special_tokens=False)["input_ids"]
    assert (logits - _full_logits(model, ids, len("Who ran?"))).abs().max() < TOL
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok)
    answer = pipe(context_chunks=texts, question="Who ran?", press=press, max_new_tokens=4)["answer"]
    # reference: greedy decoding after a full prefill of the concatenation
    out = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)
    assert answer == tok.decode(out[0, len(ids):], skip_special_tokens=True)


def test_evict_after_fusion(tmp_path):
    model = tiny_model("llama", layers=2)
    chunks, q = random_chunks(lengths=(20, 20))
    store = ChunkStore(tmp_path, model)
    press = A3Press(strategy="debug", store=store, evict="streaming_llm", evict_kwargs={"compression_ratio": 0.5})
    cache, _ = press.fuse(model, chunks, q)
    total = 1 + 40 + len(q)
    assert cache.get_seq_length() == total - int(total * 0.5)
    full, _ = A3Press(strategy="debug", store=store).fuse(model, chunks, q)
    n_sink, kept = 4, cache.get_seq_length()  # StreamingLLM keeps the first n_sink tokens and the most recent ones
    for i in range(2):  # which fused rows were kept (kvpress gathers them in score order, not position order)
        rows = torch.cdist(cache.layers[i].keys[0, 0], full.layers[i].keys[0, 0]).argmin(-1).sort().values
        assert rows.tolist() == list(range(n_sink)) + list(range(total - kept + n_sink, total))


def test_realign_matches_rope_from_scratch(tmp_path):
    model = tiny_model("gpt_neox", layers=2)  # partial rotary
    chunks, _ = random_chunks()
    store = ChunkStore(tmp_path, model)
    keys, _ = realign(model, store.prefix(), [store.get(c) for c in chunks])
    from kvpress_ext.core.adapters import get_adapter

    ad = get_adapter(model)
    attn = ad.attention_modules(model)[0]
    with torch.no_grad():
        emb = model.get_input_embeddings()(torch.tensor([[1] + flatten(chunks)]))
        x = ad.layers(model)[0].input_layernorm(emb)
        k = ad.apply_rope(model, ad.prerope_keys(attn, x), torch.arange(x.shape[1]))
    assert (keys[0] - k).abs().max() < 1e-5  # layer 0 keys depend on the token only, not on its chunk


@pytest.mark.parametrize("groups", [1, 4])
def test_masked_attention_matches_reference(groups):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2 * groups, 7, 16, generator=g)
    k, v = torch.randn(1, 2, 20, 16, generator=g), torch.randn(1, 2, 20, 16, generator=g)
    qpos = torch.tensor([0, 3, 4, 9, 15, 18, 19])
    kpos = torch.arange(20)
    ref = A.reference_attention(q, k, v, qpos, kpos, 0.25)
    out = A.masked_attention(q, k, v, qpos, kpos, 0.25)
    assert (out - ref).abs().max() < 1e-5
    assert (out[0, :, 0] - v.repeat_interleave(groups, 1)[0, :, 0]).abs().max() < 1e-6  # query 0 sees key 0 only
    if A.HAS_FLASHINFER and torch.cuda.is_available():  # flashinfer against the same reference on GPU
        dev = [t.cuda().half() for t in (q, k, v)]
        assert A.choose_backend(dev[0]) == "flashinfer"
        fl = A.masked_attention(*dev, qpos.cuda(), kpos.cuda(), 0.25).float().cpu()
        assert (fl - ref).abs().max() < 2e-2  # fp16 kernel
    else:
        assert A.choose_backend(q) == "torch"
        with pytest.raises(RuntimeError, match="flashinfer"):
            A.choose_backend(q, "flashinfer")


@pytest.mark.parametrize("block", [1, 16, 1000])
def test_blocked_attention_matches_reference(block):
    """Query blocks that see only a prefix of the keys give the same result as one masked pass, for
    scattered and unsorted query positions alike."""
    g = torch.Generator().manual_seed(1)
    n = 300
    qpos = torch.randperm(n, generator=g)[:90]  # unsorted on purpose
    q = torch.randn(1, 8, len(qpos), 16, generator=g)
    k, v = torch.randn(1, 2, n, 16, generator=g), torch.randn(1, 2, n, 16, generator=g)
    ref = A.reference_attention(q, k, v, qpos, torch.arange(n), 0.25)
    out = A.blocked_torch_attention(q, k, v, qpos, torch.arange(n), 0.25, block=block)
    assert (out - ref).abs().max() < 1e-5


def test_evict_after_fusion_with_lazy_streaming(tmp_path):
    """A whole-cache press (lazy_streaming) evicts the fused cache once: sinks + the most recent tokens, the
    recent keys re-rotated to contiguous positions, and the next token placed right after them."""
    from kvpress_ext.core.adapters import get_adapter
    from kvpress_ext.core.positions import next_position

    model = tiny_model("llama", layers=2)
    chunks, q = random_chunks(lengths=(20, 20))
    store = ChunkStore(tmp_path, model)
    cap = 24
    press = A3Press(strategy="debug", store=store, evict="lazy_streaming", evict_kwargs={"cap_total": cap, "slack": 4})
    cache, _ = press.fuse(model, chunks, q)
    full, _ = A3Press(strategy="debug", store=store).fuse(model, chunks, q)
    total, kept = full.get_seq_length(), cap - 4
    assert cache.get_seq_length() == kept and next_position(cache) == kept
    ad = get_adapter(model)
    for i in range(2):
        assert torch.equal(cache.layers[i].keys[..., :4, :], full.layers[i].keys[..., :4, :])  # sinks untouched
        assert torch.equal(cache.layers[i].values[..., 4:, :], full.layers[i].values[..., total - kept + 4 :, :])
        moved = ad.rerotate_keys(model, full.layers[i].keys[..., total - kept + 4 :, :],
                                 torch.arange(total - kept + 4, total), torch.arange(4, kept))
        assert (cache.layers[i].keys[..., 4:, :] - moved).abs().max() < 1e-5


def test_flashinfer_wrapper_layout_against_a_stand_in(monkeypatch):
    """No GPU on CI: a stand-in that follows flashinfer's documented contract (NHD tensors: (tokens, heads, dim);
    the (n_queries, n_keys) mask flattened row-major and bit-packed little-endian; GQA by head groups) checks
    that our wrapper transposes, packs and restores the layout; the real kernel is compared on a GPU above."""
    monkeypatch.setattr(A, "flashinfer", FlashinferStandIn)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 8, 11, 16, generator=g)
    k, v = torch.randn(1, 2, 37, 16, generator=g), torch.randn(1, 2, 37, 16, generator=g)
    qpos, kpos = torch.tensor([0, 2, 5, 9, 14, 20, 21, 30, 33, 35, 36]), torch.arange(37)
    out = A.flashinfer_attention(q, k, v, A.causal_mask(qpos, kpos), 0.25)
    assert out.shape == q.shape
    assert (out - A.reference_attention(q, k, v, qpos, kpos, 0.25)).abs().max() < 1e-5


# --- the `random` control strategy: its seed ---------------------------------------------------------------
def test_random_strategy_same_seed_same_selection_whatever_the_global_rng(tmp_path):
    """The seed alone decides the selection: the global RNG state (seeded differently before each call)
    does not, and the fused logits repeat exactly."""
    model = tiny_model("llama", layers=2)
    chunks, q = random_chunks(4, lengths=(15, 15, 10))
    store = ChunkStore(tmp_path, model)
    runs = []
    for global_seed in (0, 123):
        torch.manual_seed(global_seed)
        runs.append(A3Press(strategy="random", rate=0.3, seed=7, store=store).fuse_result(model, chunks, q))
    assert runs[0].selected.tolist() == runs[1].selected.tolist()
    assert torch.equal(runs[0].logits, runs[1].logits)
    sel = runs[0].selected
    assert sel.numel() == 12 and sel.unique().numel() == 12 and 0 <= int(sel.min()) and int(sel.max()) < 40
    assert sel.tolist() == sorted(sel.tolist())


def test_random_strategy_seed_is_honoured(tmp_path):
    """Different seeds pick different tokens (so recompute different rows and give different logits), and the
    press's seed reaches the selection: A3Press(seed=s) picks what random_tokens(n, k, s) picks."""
    model = tiny_model("llama", layers=2)
    chunks, q = random_chunks(4, lengths=(15, 15, 10))
    store = ChunkStore(tmp_path, model)
    results = {s: A3Press(strategy="random", rate=0.3, seed=s, store=store).fuse_result(model, chunks, q)
               for s in (0, 1, 2, 12345)}
    selections = {s: tuple(r.selected.tolist()) for s, r in results.items()}
    assert len(set(selections.values())) == len(selections)  # 4 seeds, 4 different 12-of-40 subsets
    assert not torch.equal(results[0].logits, results[1].logits)
    for s, picked in selections.items():
        assert list(picked) == S.random_tokens(40, 12, s).tolist()


def test_random_tokens_is_a_uniform_seeded_subset():
    """random_tokens(n, k, seed): k distinct sorted indices in [0, n), the same for the same seed, and over many
    seeds every index is picked about k/n of the time (a seed that were ignored would pick one fixed subset)."""
    assert S.random_tokens(30, 9, 5).tolist() == S.random_tokens(30, 9, 5).tolist()
    counts = torch.zeros(30)
    subsets = set()
    for seed in range(300):
        picked = S.random_tokens(30, 9, seed)
        assert picked.numel() == 9 and picked.unique().numel() == 9 and picked.tolist() == sorted(picked.tolist())
        assert 0 <= int(picked.min()) and int(picked.max()) < 30
        counts[picked] += 1
        subsets.add(tuple(picked.tolist()))
    assert len(subsets) > 290  # C(30, 9) ~ 1.4e7 subsets: repeats are rare
    expected = 300 * 9 / 30  # 90 picks per index; binomial sd ~ 7.9
    assert (counts - expected).abs().max() < 40
    assert S.random_tokens(10, 10, 3).tolist() == list(range(10))  # k = n: every index


def test_selection_helper_edge_cases():
    """Budgets at 0 and 1 candidates, pooling widths 1 and 2, largest-remainder order and degenerate totals."""
    assert S.budget(0.5, 0) == 0 and S.budget(1.0, -3) == 0  # no candidates: nothing to pick
    assert S.budget(0.5, 1) == 1 and S.budget(0.0, 1) == 1
    x = torch.tensor([4.0, 0, 2, 6])
    assert S.avg_pool(x.double(), 1) is not None and S.avg_pool(x.double(), 1).dtype == torch.float64  # untouched
    assert torch.equal(S.avg_pool(x, 1), x)
    # width 2: the window is the token and the one before it (the first has no predecessor: itself only)
    assert torch.allclose(S.avg_pool(x, 2), torch.tensor([4.0, 2, 1, 4]))
    # largest remainders first, whatever their position; ties by position
    assert S.largest_remainder([1, 4], 2) == [0, 2]  # quotas 0.4, 1.6
    assert S.largest_remainder([2, 5, 3], 4) == [1, 2, 1]  # quotas 0.8, 2.0, 1.2: remainder 0.8 wins
    assert S.largest_remainder([2, 3], 1) == [0, 1]
    assert S.largest_remainder([1], 1) == [1] and S.largest_remainder([7], 3) == [3]
    assert S.largest_remainder([2, 3], 0) == [0, 0]
    assert S.largest_remainder([0, 0], 3) == [0, 0]  # nothing to split over


def test_value_deviation_is_the_sum_of_squared_differences():
    g = torch.Generator().manual_seed(5)
    v_old = torch.randn(1, 2, 6, 4, generator=g)
    v_new = v_old + torch.randn(1, 2, 6, 4, generator=g)
    expected = torch.tensor([sum(float(v_new[0, h, t, d] - v_old[0, h, t, d]) ** 2 for h in range(2) for d in range(4))
                             for t in range(6)])
    assert torch.allclose(S.value_deviation(v_new, v_old), expected, atol=1e-5)
    assert torch.equal(S.value_deviation(v_old, v_old), torch.zeros(6))


def test_surprisal_chunk_errors_and_empty_budget():
    s = [torch.tensor([0.1, 0.9, 0.5]), torch.tensor([0.3, 0.2])]
    assert S.surprisal_chunk(s, [3, 2], 2).tolist() == [1, 3]  # one per chunk: the highest in each
    empty = S.surprisal_chunk(s, [3, 2], 0)
    assert empty.dtype == torch.long and empty.shape == (0,)
    with pytest.raises(CacheFormatError, match=r"^Got surprisal for 2 chunks but 3 chunks to fuse\.$"):
        S.surprisal_chunk(s, [3, 2, 1], 2)
    fix = r"Rebuild the chunk store with save_surprisal=True\.$"
    with pytest.raises(CacheFormatError, match=r"^Stored surprisal has 3 values for a chunk of 4 tokens: .*" + fix):
        S.surprisal_chunk(s, [4, 2], 2)
    with pytest.raises(CacheFormatError, match=r"^Stored surprisal has None values for a chunk of 3 tokens: .*" + fix):
        S.surprisal_chunk([None, s[1]], [3, 2], 2)
