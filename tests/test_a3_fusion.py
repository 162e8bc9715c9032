"""A³ fusion (presses/a3/fusion.py, press.py, evict.py): the selection strategies' scores, prefixes and question
forms, realignment of stored keys, the press's parameters, eviction after fusion, and the pipeline's answers.

Each test compares against a reference computed here without the fusion code: a full prefill of the
concatenated sequence (with eager attention to read its attention weights), per-chunk caches, greedy
decoding of the whole prompt, or a kvpress press applied during a full prefill.
"""

from __future__ import annotations

import time

import pytest
import torch
from transformers import DynamicCache

from kvpress_ext.core.errors import PressParameterError
from kvpress_ext.presses.a3 import A3Press, ChunkStore, realign
from kvpress_ext.presses.a3 import selection as S
from kvpress_ext.presses.a3.fusion import fuse_chunks
from kvpress_ext.runtime.pipeline import answer_from_chunks
from kvpress_ext.testing import flatten, random_chunks, tiny_model, tiny_tokenizer

TOL = 1e-4  # float32 logits of tiny models
SCORE_TOL = 1e-5  # selection scores: fusion and the reference differ only by float rounding


pytestmark = pytest.mark.usefixtures("one_thread")


@torch.no_grad()
def _full(model, ids, **kw):
    return model(torch.tensor([ids]), **kw)


def _assert_top(selected, scores, k):
    """``selected`` holds k sorted distinct indices whose reference scores are the k largest (up to rounding)."""
    sel = selected.tolist()
    assert len(sel) == k and sel == sorted(set(sel))
    rest = torch.ones(scores.numel(), dtype=torch.bool)
    rest[selected] = False
    if rest.any():
        assert float(scores[selected].min()) >= float(scores[rest].max()) - SCORE_TOL


# --- selection: the scores the strategies rank by, recomputed from a full prefill -------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
@pytest.mark.parametrize("layer", [1, 2])
def test_debug_selection_ranks_question_attention_of_a_full_prefill(arch, layer, tmp_path):
    """Layers below the selection layer are recomputed in full, so the selection layer sees exactly the full
    prefill's queries and keys: A3's score is that layer's attention of the question tokens to each document
    token (summed over heads and question tokens), average-pooled."""
    model = tiny_model(arch, layers=3, attn_implementation="eager")
    chunks, q = random_chunks(5, lengths=(12, 9, 11), q_len=4)
    n_doc, pool = 32, 3
    r = A3Press(strategy="debug", rate=0.25, selection_layer=layer, pool_width=pool,
                store=ChunkStore(tmp_path, model)).fuse_result(model, chunks, q)
    att = _full(model, [1] + flatten(chunks) + q, output_attentions=True).attentions[layer]  # (1, H, T, T)
    scores = S.avg_pool(att[0, :, -len(q):, 1 : 1 + n_doc].sum(dim=(0, 1)), pool)
    _assert_top(r.selected, scores, 8)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
@pytest.mark.parametrize("layer", [1, 2])
def test_blend_selection_ranks_value_deviation_from_a_full_prefill(arch, layer, tmp_path):
    """CacheBlend's score: squared distance between the full prefill's values at the selection layer and the
    chunk's own stored values."""
    model = tiny_model(arch, layers=3)
    chunks, q = random_chunks(6, lengths=(10, 14), q_len=3)
    store = ChunkStore(tmp_path, model)
    r = A3Press(strategy="blend", rate=0.3, selection_layer=layer, store=store).fuse_result(model, chunks, q)
    cache = DynamicCache()
    _full(model, [1] + flatten(chunks) + q, past_key_values=cache)
    fresh = cache.layers[layer].values[0, :, 1 : 1 + 24]
    stored = torch.cat([store.get(c).values[layer][0] for c in chunks], dim=-2)
    _assert_top(r.selected, ((fresh - stored) ** 2).sum(dim=(0, 2)), 7)


def test_attnlink_keeps_document_sinks_and_ranks_by_their_attention(tmp_path):
    """attnlink scores with the sinks' queries (one document token, one question token); a document sink is
    always kept, a question sink is not a document index."""
    model = tiny_model("llama", layers=3, attn_implementation="eager")
    chunks, q = random_chunks(7, lengths=(10, 10), q_len=4)
    n_doc, pool = 20, 2
    sinks = [1, 1 + n_doc]  # the first document token (lowest allowed index) and the first question token
    r = A3Press(strategy="attnlink", rate=0.2, pool_width=pool, sink_positions=sinks,
                store=ChunkStore(tmp_path, model)).fuse_result(model, chunks, q)
    att = _full(model, [1] + flatten(chunks) + q, output_attentions=True).attentions[1]
    scores = S.avg_pool(att[0][:, sinks, 1 : 1 + n_doc].sum(dim=(0, 1)), pool)
    sel = r.selected.tolist()
    assert len(sel) == 4 and sel == sorted(set(sel)) and sel[0] == 0 and max(sel) < n_doc
    _assert_top(r.selected[1:] - 1, scores[1:], 3)  # the rest: the best-scored other document tokens


def test_attnlink_sink_range_is_checked_at_both_ends(tmp_path):
    model = tiny_model("llama", layers=2)
    chunks, q = random_chunks()
    store = ChunkStore(tmp_path, model)
    total = 1 + 28 + len(q)
    r = A3Press(strategy="attnlink", sink_positions=[total - 1], store=store).fuse_result(model, chunks, q)
    assert r.selected.numel() == S.budget(0.15, 28)
    msg = r"^attnlink sink_positions must lie in \[1, 34\) \(document or question tokens; the prefix is not recomputed\)"
    for bad in ([total], [0, 5]):
        with pytest.raises(PressParameterError, match=msg + rf", got {bad}\.$".replace("[", r"\[").replace("]", r"\]")):
            A3Press(strategy="attnlink", sink_positions=bad, store=store).fuse(model, chunks, q)


def test_fuse_chunks_direct_calls_without_chunks_or_sinks(tmp_path):
    """fuse_chunks is public: with no chunk at all, ``cat`` has no document token to pick and the result is a
    prefill of prefix + question; ``attnlink`` without sinks is refused with the fix."""
    model = tiny_model("llama", layers=2)
    store = ChunkStore(tmp_path, model)
    q = [5, 9, 17, 33]
    r = fuse_chunks(model, store.prefix(), [], q, strategy="cat")
    assert r.selected.tolist() == [] and r.selected.dtype == torch.long
    assert (r.logits - _full(model, [1] + q).logits[0, 1:]).abs().max() < TOL
    with pytest.raises(PressParameterError, match=r"^strategy='attnlink' needs sink_positions \(global token indices\)\.$"):
        fuse_chunks(model, store.prefix(), [store.get([7, 8, 9])], q, strategy="attnlink", sink_positions=[])


# --- prefixes, question forms and what reaches fuse_chunks ---------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_no_prefix_store_at_rate_one_equals_a_full_prefill_without_bos(arch, tmp_path):
    """A store with an empty prefix encodes each chunk from position 0; fused at rate 1 the result is a prefill of
    chunks + question alone (chunk k's keys move from 0.. to its global offset)."""
    model = tiny_model(arch, layers=3)
    chunks, q = random_chunks(8)
    press = A3Press(strategy="debug", rate=1.0, store=ChunkStore(tmp_path, model, prefix_ids=[]))
    cache, logits = press.fuse(model, chunks, q)
    assert cache.get_seq_length() == 28 + len(q)
    assert (logits - _full(model, flatten(chunks) + q).logits[0, -len(q):]).abs().max() < TOL
    # rate 0 (`full`): the chunks' keys alone, each moved to its offset, without a prefix
    keys, _ = realign(model, None, [press.store.get(c) for c in chunks])
    ref = []
    for c in chunks:
        cc = DynamicCache()
        _full(model, c, past_key_values=cc)
        ref.append(cc.layers[0].keys)
    from kvpress_ext.core.adapters import get_adapter

    ad = get_adapter(model)
    moved, off = [], 0
    for c, k in zip(chunks, ref):
        moved.append(ad.rerotate_keys(model, k, torch.arange(len(c)), torch.arange(off, off + len(c))))
        off += len(c)
    assert (keys[0] - torch.cat(moved, dim=-2)).abs().max() < 1e-5


def test_prefix_ids_and_question_forms_reach_the_fusion(tmp_path):
    """prefix_ids given to fuse replace the store's prefix (chunks are encoded after it); a question as a tensor,
    a list or text gives the same logits."""
    model, tok = tiny_model("llama", layers=3), tiny_tokenizer()  # 3 layers: the last one keeps stored K/V
    chunks, q = random_chunks(9)
    press = A3Press(strategy="debug", rate=1.0, store=ChunkStore(tmp_path, model, tok))
    prefix = [1, 40, 41, 42]
    _, logits = press.fuse(model, chunks, q, prefix_ids=prefix)
    assert (logits - _full(model, prefix + flatten(chunks) + q).logits[0, -len(q):]).abs().max() < TOL
    _, default = press.fuse(model, chunks, q)
    assert (default - logits).abs().max() > 1e-3  # the prefix did change the result
    _, as_tensor = press.fuse(model, chunks, torch.tensor(q), prefix_ids=prefix)
    assert torch.equal(as_tensor, logits)
    text = "Who ran?"
    _, from_text = press.fuse(model, chunks, text)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert torch.equal(from_text, press.fuse(model, chunks, ids)[1])
    # below rate 1 the stored chunk caches matter: they are the ones encoded after the given prefix, as if it
    # were the store's own prefix
    partial = A3Press(strategy="debug", rate=0.2, store=press.store)
    own = A3Press(strategy="debug", rate=0.2, store=ChunkStore(tmp_path / "own", model, prefix_ids=prefix))
    given = partial.fuse(model, chunks, q, prefix_ids=prefix)[1]
    assert torch.equal(given, own.fuse(model, chunks, q)[1])
    assert (given - partial.fuse(model, chunks, q)[1]).abs().max() > 1e-3


def _bf16(entry):
    from kvpress_ext.storage.chunk_store import ChunkKV

    return ChunkKV(entry.token_ids, [k.bfloat16() for k in entry.keys], [v.bfloat16() for v in entry.values],
                   entry.prefix_len)


def test_realign_casts_stored_keys_before_rotating(tmp_path):
    """Chunks stored in bfloat16 and fused in float32: keys are cast first and then rotated, so the moved keys
    match a float32 rotation of the stored keys (rotating in bfloat16 would round them to ~3 digits); the
    prefix alone (no chunk) comes back in the requested dtype too."""
    from kvpress_ext.core.adapters import get_adapter
    from kvpress_ext.core.rope import rotate

    model = tiny_model("llama", layers=2)
    chunks, _ = random_chunks(10)
    store = ChunkStore(tmp_path, model)
    prefix, entries = _bf16(store.prefix()), [_bf16(store.get(c)) for c in chunks]
    keys, values = realign(model, prefix, entries, dtype=torch.float32)
    assert keys[1].dtype == values[1].dtype == torch.float32
    inv = get_adapter(model).inv_freq(model)
    ref, off = [prefix.keys[1].float()], 1
    for e in entries:
        ref.append(rotate(e.keys[1].float(), torch.full((len(e),), float(off - 1)), inv))
        off += len(e)
    assert (keys[1] - torch.cat(ref, dim=-2)).abs().max() < 1e-6
    assert torch.equal(values[1], torch.cat([prefix.values[1]] + [e.values[1] for e in entries], -2).float())
    only_prefix, only_values = realign(model, prefix, [], dtype=torch.float32)
    assert only_prefix[0].dtype == only_values[0].dtype == torch.float32
    assert torch.equal(only_prefix[0], prefix.keys[0].float())


def test_realign_and_evict_build_positions_on_the_caches_device(tmp_path):
    """Position tensors follow the K/V's device, not torch's default device (a stand-in for a model on a GPU
    while the default device is the CPU): under a `meta` default device both still work on the CPU tensors."""
    from kvpress_ext.presses.a3.evict import evict_cache

    model = tiny_model("llama", layers=2)
    chunks, q = random_chunks(13, lengths=(8, 8), q_len=4)
    store = ChunkStore(tmp_path, model)
    prefix, entries = store.prefix(), [store.get(c) for c in chunks]
    ref_keys, _ = realign(model, prefix, entries)
    with torch.device("meta"):
        keys, _ = realign(model, prefix, entries)
    assert keys[1].device.type == "cpu" and torch.equal(keys[1], ref_keys[1])
    kw = {"compression_ratio": 0.5, "window_size": 4}
    a = fuse_chunks(model, prefix, entries, q, strategy="debug", rate=1.0, record_inputs=True)
    b = fuse_chunks(model, prefix, entries, q, strategy="debug", rate=1.0, record_inputs=True)
    evict_cache(model, a, "snapkv", kw)
    with torch.device("meta"):
        evict_cache(model, b, "snapkv", kw)
    assert b.cache.get_seq_length() == a.cache.get_seq_length() == 10
    assert torch.equal(a.cache.layers[1].keys, b.cache.layers[1].keys)


def test_surprisal_chunk_with_a_store_that_does_not_save_surprisal(tmp_path):
    """``surprisal_chunk`` asks the store for surprisal, so new entries get it even without save_surprisal; the
    picks are each chunk's most surprising tokens under the model (budget split by largest remainder)."""
    model = tiny_model("llama", layers=2)
    chunks, q = random_chunks(11, lengths=(10, 15))
    r = A3Press(strategy="surprisal_chunk", rate=0.2, store=ChunkStore(tmp_path, model)).fuse_result(model, chunks, q)
    surps = []
    for c in chunks:
        logp = _full(model, [1] + c).logits[0].log_softmax(-1)
        surps.append(torch.cat([torch.zeros(1), -logp[1:-1].gather(-1, torch.tensor(c[1:])[:, None]).squeeze(-1)]))
    expected = []
    for off, s, n in zip((0, 10), surps, S.largest_remainder([10, 15], 5)):
        expected += (torch.topk(s, n).indices + off).tolist()
    assert r.selected.tolist() == sorted(expected)


def test_timings_are_durations_within_the_call(tmp_path):
    model = tiny_model("llama", layers=2)
    chunks, q = random_chunks(lengths=(20, 20))
    press = A3Press(strategy="debug", store=ChunkStore(tmp_path, model), evict="streaming_llm",
                    evict_kwargs={"compression_ratio": 0.5})
    t0 = time.perf_counter()
    r = press.fuse_result(model, chunks, q)
    wall = time.perf_counter() - t0
    t = r.timings
    assert set(t) == {"load_s", "fuse_s", "evict_s", "realign_s"}
    assert all(0 <= v <= wall for v in t.values())
    assert t["load_s"] + t["fuse_s"] + t["evict_s"] <= wall and t["realign_s"] <= t["fuse_s"]


# --- parameters ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"rate": True}, r"^a3: rate=True must be a number in \[0, 1\] \(fraction recomputed\)\.$"),
    ({"rate": -0.1}, r"^a3: rate=-0.1 must be"),
    ({"selection_layer": -1}, r"^a3: selection_layer=-1 must be an int >= 0\.$"),
    ({"selection_layer": 1.5}, r"^a3: selection_layer=1.5 must be an int >= 0\.$"),
    ({"selection_layer": True}, r"^a3: selection_layer=True must be an int >= 0\.$"),
    ({"selection_layer": "1"}, r"^a3: selection_layer='1' must be an int >= 0\.$"),
    ({"pool_width": 0}, r"^a3: pool_width=0 must be a positive integer\.$"),
    ({"pool_width": 2.0}, r"^a3: pool_width=2.0 must be a positive integer\.$"),
    ({"pool_width": True}, r"^a3: pool_width=True must be a positive integer\.$"),
    ({"pool_width": "3"}, r"^a3: pool_width='3' must be a positive integer\.$"),
    ({"strategy": "attnlink"}, r"^a3: strategy='attnlink' needs sink_positions \(global token indices\), got none\.$"),
    ({"strategy": "nope"}, (r"^a3: strategy='nope' is unknown; choose from blend, debug, attnlink, full, cat, "
                            r"surprisal_chunk, random\.$")),
    ({"attention_backend": "cuda"}, r"^a3: attention_backend must be 'auto', 'torch' or 'flashinfer'\.$"),
])
def test_bad_parameters_name_the_fix(kwargs, message):
    with pytest.raises(PressParameterError, match=message):
        A3Press(**kwargs)


def test_boundary_parameters_are_accepted():
    for kw in ({"rate": 0}, {"rate": 1}, {"rate": 0.0}, {"selection_layer": 0}, {"pool_width": 1},
               {"attention_backend": "torch"}, {"attention_backend": "flashinfer"}, {"attention_backend": "auto"}):
        press = A3Press(**kw)
        assert all(getattr(press, k) == v for k, v in kw.items())
    assert [A3Press(strategy=s, sink_positions=[1]).selection_layer for s in
            ("blend", "debug", "attnlink", "full", "cat", "surprisal_chunk", "random")] == [1, 1, 1, 0, 0, 0, 0]


def test_fuse_errors_and_the_backend_reaching_the_fusion(tmp_path):
    model = tiny_model("llama", layers=2)
    chunks, q = random_chunks()
    with pytest.raises(PressParameterError, match=r"^a3: A3Press\.fuse needs store=ChunkStore\(\.\.\.\)\.$"):
        A3Press().fuse(model, chunks, q)
    store = ChunkStore(tmp_path, model)
    with pytest.raises(ValueError, match=r"^a3: fuse needs at least one chunk\.$"):
        A3Press(store=store).fuse(model, [], q)
    # the press's backend reaches the attention: flashinfer is refused on a CPU tensor
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="flashinfer"):
            A3Press(store=store, attention_backend="flashinfer").fuse(model, chunks, q)


# --- eviction after fusion ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
@pytest.mark.parametrize("name, kwargs", [("snapkv", {"compression_ratio": 0.5, "window_size": 4}),
                                          ("knorm", {"compression_ratio": 0.4})])
def test_evict_at_rate_one_equals_the_press_during_a_full_prefill(arch, name, kwargs, tmp_path):
    """At rate 1 the fused cache and the recorded layer inputs are a full prefill's, so evicting after fusion
    keeps what the press keeps when it runs during a full prefill (SnapKV rotates its window queries with the
    RoPE tables evict hands it)."""
    from kvpress_ext.core.apply import apply_press
    from kvpress_ext.core.registry import get_press

    model = tiny_model(arch, layers=2)
    chunks, q = random_chunks(12, lengths=(12, 12), q_len=6)
    press = A3Press(strategy="debug", rate=1.0, store=ChunkStore(tmp_path, model), evict=name, evict_kwargs=kwargs)
    cache, _ = press.fuse(model, chunks, q)
    ref = DynamicCache()
    with apply_press(get_press(name, **kwargs), model):
        _full(model, [1] + flatten(chunks) + q, past_key_values=ref)
    assert cache.get_seq_length() == ref.get_seq_length() < 1 + 24 + 6
    for i in range(2):
        a = cache.layers[i].keys.sort(dim=-2).values  # rows may be gathered in another order
        b = ref.layers[i].keys.sort(dim=-2).values
        assert (a - b).abs().max() < 1e-4
        assert (cache.layers[i].values.sort(dim=-2).values - ref.layers[i].values.sort(dim=-2).values).abs().max() < 1e-4


def test_evict_refuses_presses_that_run_the_model_and_no_press_keeps_everything(tmp_path):
    model = tiny_model("llama", layers=2)
    chunks, q = random_chunks()
    store = ChunkStore(tmp_path, model)
    with pytest.raises(PressParameterError, match=r"^a3: evict='kvzip' must be a hook-based press \(e\.g\. streaming_llm, "
                                                  r"snapkv, knorm\)\.$"):
        A3Press(store=store, evict="kvzip").fuse(model, chunks, q)
    kept, logits = A3Press(store=store, evict="no_press").fuse(model, chunks, q)
    plain, ref = A3Press(store=store).fuse(model, chunks, q)
    assert torch.equal(logits, ref) and kept.get_seq_length() == plain.get_seq_length() == 1 + 28 + len(q)
    assert all(torch.equal(kept.layers[i].keys, plain.layers[i].keys) for i in range(2))


def test_evict_hands_the_model_to_the_press(tmp_path, monkeypatch):
    """A press whose set-up reads the model (post_init_from_model) gets the model, as under apply_press."""
    from kvpress.presses.knorm_press import KnormPress

    from kvpress_ext.presses.a3 import evict as E

    class NeedsModel(KnormPress):
        def post_init_from_model(self, model):
            self.n_layers = model.config.num_hidden_layers

    press = NeedsModel(compression_ratio=0.5)
    monkeypatch.setattr(E, "get_press", lambda name, **kw: press)
    model = tiny_model("llama", layers=2)
    chunks, q = random_chunks()
    cache, _ = A3Press(store=ChunkStore(tmp_path, model), evict="knorm").fuse(model, chunks, q)
    assert press.n_layers == 2 and cache.get_seq_length() == (1 + 28 + len(q)) - int((1 + 28 + len(q)) * 0.5)


# --- the pipeline --------------------------------------------------------------------------------------------------
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEXTS = ["The cat sat. ", "A dog ran far away. ", "Then it rained.\n"]


def _bos_tokenizer():
    """The character tokenizer, adding BOS like Llama's when asked for special tokens."""
    from tokenizers import processors

    tok = tiny_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def _pipe(model, tok):
    from transformers import pipeline

    import kvpress_ext.runtime.pipeline  # noqa: F401 - registers the pipeline

    return pipeline("kv-press-text-generation", model=model, tokenizer=tok)


@torch.no_grad()
def _greedy(model, ids, n, eos=()):
    """Reference: greedy decoding that re-reads the whole sequence at every step (no cache, no fusion)."""
    out = []
    for _ in range(n):
        out.append(int(model(torch.tensor([ids + out])).logits[0, -1].argmax()))
        if out[-1] in eos:
            break
    return out


def _ids(tok, text):
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _text(tok, ids):
    return tok.decode(ids, skip_special_tokens=True)


def test_pipeline_questions_answer_prefix_and_lengths(tmp_path):
    """Raw prompts (no template): every question is answered from the same fused chunks like greedy decoding of
    BOS + context + question + answer_prefix; max_new_tokens 1, 2 and the default 50 are honoured."""
    model, tok = tiny_model("llama", layers=2), _bos_tokenizer()
    model.generation_config.eos_token_id = None
    store = ChunkStore(tmp_path, model)  # no tokenizer: the pipeline lends its own
    press, pipe = A3Press(strategy="debug", rate=1.0, store=store), _pipe(model, tok)
    ctx = "".join(TEXTS)
    qs = ["Who ran?", "Who sat?"]
    out = pipe(context_chunks=TEXTS, questions=qs, press=press, answer_prefix=" It", max_new_tokens=3)
    assert out == {"answers": [_text(tok, _greedy(model, [1] + _ids(tok, ctx + q + " It"), 3)) for q in qs]}
    ids = [1] + _ids(tok, ctx + qs[0])
    for n in (1, 2):
        assert pipe(context_chunks=TEXTS, question=qs[0], press=press, max_new_tokens=n) == {
            "answer": _text(tok, _greedy(model, ids, n))}
    assert pipe(context_chunks=TEXTS, question=qs[0], press=press)["answer"] == _text(tok, _greedy(model, ids, 50))


def test_pipeline_stops_at_end_of_sequence_and_drops_special_tokens(tmp_path):
    """Decoding stops after an end-of-sequence token (an int or a list in generation_config), also when it is the
    first token; special tokens are not in the answer text."""
    model, tok = tiny_model("llama", layers=2), _bos_tokenizer()
    model.generation_config.eos_token_id = None
    press = A3Press(strategy="debug", rate=1.0, store=ChunkStore(tmp_path, model, tok))
    pipe, q = _pipe(model, tok), "Who ran?"
    ids = [1] + _ids(tok, "".join(TEXTS) + q)
    free = _greedy(model, ids, 8)
    with torch.no_grad():  # make the model say </s> (id 2) where it said its third token
        head = model.get_output_embeddings().weight
        head[[2, free[2]]] = head[[free[2], 2]]
    ref = _greedy(model, ids, 8, eos={2})
    assert ref[-1] == 2 and len(ref) < 8  # the reference does stop on </s>
    for eos in (2, [2, 0]):
        model.generation_config.eos_token_id = eos
        answer = pipe(context_chunks=TEXTS, question=q, press=press, max_new_tokens=8)["answer"]
        assert answer == _text(tok, ref) and "</s>" not in answer
    model.generation_config.eos_token_id = ref[0]  # the first token already ends the answer
    assert pipe(context_chunks=TEXTS, question=q, press=press, max_new_tokens=8)["answer"] == _text(tok, ref[:1])
    model.generation_config.eos_token_id = None  # no end token: all 8
    full = pipe(context_chunks=TEXTS, question=q, press=press, max_new_tokens=8)["answer"]
    assert full == _text(tok, _greedy(model, ids, 8))


def test_pipeline_with_a_chat_template(tmp_path):
    """With a chat template the template's prefix is the fused prefix and the question's suffix is recomputed:
    at rate 1 the answer is greedy decoding of the whole templated prompt (the last chunk's trailing newline
    shortens the blank line before the question), for text chunks and token-id chunks alike; with
    use_chat_template=False it is the raw prompt after the store's prefix."""
    model, tok = tiny_model("llama", layers=2, seed=7), _bos_tokenizer()  # seed 7: answers depend on the blank line
    model.generation_config.eos_token_id = None
    tok.chat_template = CHATML
    store = ChunkStore(tmp_path, model, prefix_ids=[1, 50, 60])
    press, pipe, q = A3Press(strategy="debug", rate=1.0, store=store), _pipe(model, tok), "Who ran?"
    ctx = "".join(TEXTS)
    text = tok.apply_chat_template([{"role": "user", "content": ctx + "\n" + q}], tokenize=False,
                                   add_generation_prompt=True)
    expected = _text(tok, _greedy(model, _ids(tok, text), 6))
    for sep in ("", "\n\n"):  # the test can tell the separators apart
        other = tok.apply_chat_template([{"role": "user", "content": ctx + sep + q}], tokenize=False,
                                        add_generation_prompt=True)
        assert _text(tok, _greedy(model, _ids(tok, other), 6)) != expected
    assert pipe(context_chunks=TEXTS, question=q, press=press, max_new_tokens=6)["answer"] == expected
    # token-id chunks are decoded for the separator (the character tokenizer has no newline token, so these end
    # without one and get the full blank line)
    as_ids = [_ids(tok, t) for t in TEXTS[:2] + ["Then it rained."]]
    text = tok.apply_chat_template([{"role": "user", "content": _text(tok, flatten(as_ids)) + "\n\n" + q}],
                                   tokenize=False, add_generation_prompt=True)
    assert pipe(context_chunks=as_ids, question=q, press=press, max_new_tokens=6)["answer"] == _text(
        tok, _greedy(model, _ids(tok, text), 6))
    raw = pipe(context_chunks=TEXTS, question=q, press=press, max_new_tokens=6, use_chat_template=False)["answer"]
    assert raw == _text(tok, _greedy(model, [1, 50, 60] + _ids(tok, ctx + q), 6))
    assert raw != _text(tok, _greedy(model, [1] + _ids(tok, ctx + q), 6))  # the store's prefix, not the BOS text


def test_pipeline_errors(tmp_path):
    model, tok = tiny_model("llama", layers=2), tiny_tokenizer()
    pipe = _pipe(model, tok)
    press = A3Press(store=ChunkStore(tmp_path, model, tok))
    with pytest.raises(TypeError, match=r"^a3 pipeline does not support top_k, foo$"):
        answer_from_chunks(pipe, press, TEXTS, question="x", top_k=3, foo=1)
    with pytest.raises(PressParameterError, match=r"^a3: A3Press\.fuse needs store=ChunkStore\(\.\.\.\)\.$"):
        answer_from_chunks(pipe, A3Press(), TEXTS, question="x")
    with pytest.raises(ValueError, match=r"^a3: fuse needs at least one chunk\.$"):
        answer_from_chunks(pipe, press, [], question="x")
    for kw in ({}, {"questions": []}, {"questions": None}):
        with pytest.raises(ValueError, match=r"^a3 pipeline needs question= or questions=\.$"):
            answer_from_chunks(pipe, press, TEXTS, **kw)
    with pytest.raises(ValueError, match=r"^context_chunks=\.\.\. needs a press that fuses chunk caches"):
        pipe(context_chunks=TEXTS, question="x", press="knorm")