"""Lazy-pruning StreamingLLM (kvpress_ext.presses.lazy_streaming) against from-scratch references."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvpress_ext.core.adapters import get_adapter
from kvpress_ext.core.apply import apply_press
from kvpress_ext.core.errors import PressParameterError
from kvpress_ext.core.positions import next_position
from kvpress_ext.core.registry import get_press
from kvpress_ext.presses.lazy_streaming import LazyStreamingPress, chunked_prefill
from kvpress_ext.runtime.pipeline import greedy_decode
from kvpress_ext.testing import ARCHITECTURES, attention_inputs, tiny_model

ATOL = 1e-4  # float32


def _stream(model, press, chunks):
    """Feed ``chunks`` (lists of token ids) one forward each; mirror the kept tokens; yield (logits, attended)."""
    cache = DynamicCache()
    kept: list[int] = []
    with apply_press(press, model):
        for chunk in chunks:
            out = model(input_ids=torch.tensor([chunk]), past_key_values=cache)
            attended = kept + list(chunk)
            kept = attended
            if press is not None and len(kept) > press.max_cache:
                kept = kept[: press.n_sink] + kept[len(kept) - press.recent :]
            yield out.logits[0, -1], attended, cache, kept


def _chunks(seed=0, prompt=30, prefill_chunk=4, decode=40, vocab=128):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (prompt + decode,), generator=g).tolist()
    chunks = [ids[i : min(i + prefill_chunk, prompt)] for i in range(0, prompt, prefill_chunk)]
    return chunks + [[t] for t in ids[prompt:]]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt_neox"])
def test_logits_equal_from_scratch_on_kept_tokens(arch):
    """One layer: a cached key is a function of its token and position only, so after every compaction the
    press must give exactly the logits of a cache-free run over the kept tokens at positions 0..n-1."""
    model = tiny_model(arch, layers=1)
    press = LazyStreamingPress(n_sink=2, cap_total=16, slack=4)
    chunks = _chunks(prompt=22, decode=22)
    dense = [logits for logits, *_ in _stream(model, None, chunks)]
    compacted = False
    checked = 0
    for step, (logits, attended, cache, kept) in enumerate(_stream(model, press, chunks)):
        if not compacted:
            # identical computation until the cache first passes the cap: bit-exact
            assert torch.equal(logits, dense[step]), step
        else:
            ref = model(input_ids=torch.tensor([attended])).logits[0, -1]
            torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)
            checked += 1
        compacted = compacted or len(kept) < len(attended)
        assert cache.get_seq_length() == len(kept) <= press.max_cache
        assert next_position(cache) == len(kept)
    assert checked > 20
    # and the compressed run really differs from dense once tokens were evicted
    assert not torch.allclose(logits, dense[-1], atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cache_equals_prerope_keys_rotated_to_cache_indices(arch):
    """Two layers, every adapter: after compactions each layer holds the kept tokens' values and their
    pre-RoPE keys rotated to positions 0..n-1 (computed independently from the captured attention inputs)."""
    model = tiny_model(arch, layers=2)
    adapter = get_adapter(model)
    press = LazyStreamingPress(n_sink=3, window=9, slack=5)
    token_index: list[int] = []  # stream index of every cached token, mirrored
    seen = 0
    with attention_inputs(model) as captured:
        for _, attended, cache, kept in _stream(model, press, _chunks(prompt=20, prefill_chunk=6, decode=25)):
            n_new = len(attended) - len(token_index)
            token_index = token_index + list(range(seen, seen + n_new))
            seen += n_new
            if len(token_index) > press.max_cache:
                token_index = token_index[: press.n_sink] + token_index[-press.recent :]
    assert seen == 45 and len(token_index) <= press.max_cache
    positions = torch.arange(len(token_index))
    compressed = adapter.compressed_layers(model)
    for i, (layer, module) in enumerate(zip(cache.layers, adapter.attention_modules(model))):
        kept, pos = token_index, positions
        if i not in compressed:  # Gemma 3's sliding layer: every token, shifted as the next position moved
            kept = list(range(seen))
            pos = torch.arange(seen) + (next_position(cache) - seen)
        with torch.no_grad():
            hidden = torch.cat(captured[i], dim=1)
            keys = adapter.prerope_keys(module, hidden)[..., kept, :]
            values = adapter.values(module, hidden)[..., kept, :]
        torch.testing.assert_close(layer.keys, adapter.apply_rope(model, keys, pos, layer=i), atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.values, values, atol=1e-6, rtol=0)
    assert (compressed == [1]) == (arch == "gemma3")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_model_generate_matches_greedy_loop(arch):
    model = tiny_model(arch, layers=2)
    press = get_press("lazy_streaming", n_sink=2, cap_total=20, slack=3)
    prompt = torch.randint(4, 128, (1, 27), generator=torch.Generator().manual_seed(1))  # longer than the cap
    cache = DynamicCache()
    with apply_press(press, model):
        ours = greedy_decode(model, prompt, cache, max_new_tokens=30)
    gen_cache = DynamicCache()
    with press(model):
        out = model.generate(prompt, past_key_values=gen_cache, max_new_tokens=30, do_sample=False)
    assert out[0, prompt.shape[1] :].tolist() == ours
    assert gen_cache.get_seq_length() == cache.get_seq_length() <= 20


@pytest.mark.slow
def test_cache_never_exceeds_cap_total_over_long_generation():
    model = tiny_model("llama", layers=1)
    press = LazyStreamingPress(n_sink=4, cap_total=24, slack=5)
    cache = DynamicCache()
    lengths = []
    with apply_press(press, model):
        chunked_prefill(model, torch.randint(4, 128, (1, 60)), cache, press.prefill_chunk_size)
        lengths.append(cache.get_seq_length())
        token = torch.tensor([[5]])
        for _ in range(150):
            out = model(input_ids=token, past_key_values=cache)
            token = out.logits[:, -1:].argmax(-1)
            lengths.append(cache.get_seq_length())
            assert next_position(cache) == lengths[-1]
    assert max(lengths) == 24 and min(lengths[1:]) == press.cap == 19


def test_eager_slack_zero_compacts_every_token():
    model = tiny_model("qwen2", layers=1)
    press = LazyStreamingPress(n_sink=4, cap_total=12, slack=0)
    lengths = [cache.get_seq_length() for *_, cache, _ in _stream(model, press, [[i] for i in range(4, 30)])]
    assert lengths == list(range(1, 13)) + [12] * 14


@pytest.mark.parametrize(
    "params, message",
    [
        ({"window": 0}, "window"),
        ({"window": -3}, "window"),
        ({"window": 8, "slack": -1}, "slack"),
        ({"cap_total": 6, "n_sink": 4, "slack": 2}, "too small"),
        ({"cap_total": 3, "n_sink": 4, "slack": 0}, "too small"),
        ({"window": 8, "cap_total": 16}, "exactly one"),
        ({}, "exactly one"),
        ({"window": 8, "n_sink": -1}, "n_sink"),
    ],
)
def test_invalid_settings(params, message):
    with pytest.raises(PressParameterError, match=message):
        LazyStreamingPress(**params)
    with pytest.raises(PressParameterError):
        get_press("lazy_streaming", **params)


def test_sizes_from_cap_total_and_window():
    p = LazyStreamingPress(cap_total=512, slack=64)
    assert (p.recent, p.cap, p.max_cache) == (444, 448, 512)
    q = LazyStreamingPress(window=100, slack=10, n_sink=2)
    assert (q.recent, q.cap, q.max_cache) == (100, 102, 112)


@pytest.mark.slow
def test_stories260k_lazy_tracks_the_recompute_reference_past_the_trained_length(stories260k):
    """Quality guard on a real model (the full 20k-token study is evaluation/streaming_quality.py): over
    tokens 512..1279 of TinyStories, lazy streaming with cap_total=512 stays within 5 % of the sliding window
    recomputed from scratch at every scored target, while the dense cache is already far off."""
    import math

    from conftest import shared_path

    from kvpress_ext.evaluation.streaming import dense_nlls, recompute_reference_nlls, streaming_nlls

    model, tok = stories260k
    text = shared_path("data", "tinystories_val.txt").read_text()[:20000]
    ids = torch.tensor(tok(text)["input_ids"][:1281])
    with torch.no_grad():
        ref = recompute_reference_nlls(model, ids, n_sink=4, total=512, batch=32, stride=4)
        lazy = streaming_nlls(model, ids, LazyStreamingPress(n_sink=4, cap_total=512, slack=64))
        dense = dense_nlls(model, ids)
    scored = ~torch.isnan(ref)
    scored[:512] = False  # before the cap every method is the same computation
    ppl = {name: math.exp(float(v[scored].mean())) for name, v in (("ref", ref), ("lazy", lazy), ("dense", dense))}
    assert abs(ppl["lazy"] / ppl["ref"] - 1) < 0.05, ppl
    assert ppl["dense"] > 1.2 * ppl["ref"], ppl  # the setting really needs streaming (the test can tell)
    assert torch.allclose(lazy[:512], ref[:512], atol=1e-4)


@pytest.mark.slow
def test_pipeline_streams_a_context_longer_than_the_model_limit(stories260k):
    """The pipeline neither truncates the context to the tokenizer's 512 tokens nor prefills it in one piece:
    it feeds it in chunks through the press, as a direct chunked_prefill + greedy loop does."""
    from transformers import pipeline

    model, tok = stories260k
    text = shared_path_text()[:9000]
    question = " The end."
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok)
    cache = DynamicCache()
    answer = pipe(text, question=question, press=LazyStreamingPress(cap_total=128, slack=16), max_new_tokens=12,
                  cache=cache)["answer"]
    assert cache.get_seq_length() <= 128 + 12 + len(tok(question, add_special_tokens=False)["input_ids"])
    # reference: the same token ids as the pipeline builds them, streamed directly
    inputs = pipe.preprocess(text, questions=[question], answer_prefix="", max_context_length=int(1e10))
    assert inputs["context_ids"].shape[1] > 1500  # really longer than the model's 512
    press, ref_cache = LazyStreamingPress(cap_total=128, slack=16), DynamicCache()
    with torch.no_grad(), apply_press(press, model):
        chunked_prefill(model, inputs["context_ids"], ref_cache, press.prefill_chunk_size)
        ids = greedy_decode(model, inputs["questions_ids"][0], ref_cache, 12, {model.generation_config.eos_token_id})
    assert answer == tok.decode(ids, skip_special_tokens=True)


def shared_path_text() -> str:
    from conftest import shared_path

    return shared_path("data", "tinystories_val.txt").read_text()


@pytest.mark.slow
def test_generate_past_the_trained_length_without_the_max_length_reminder(caplog):
    """Positions under lazy_streaming are cache indices (below cap_total), so transformers' reminder that a
    generation "has exceeded the model's predefined maximum length" is wrong there and is not shown; the same
    generation without the press shows it (the check can fail)."""
    import logging

    def generate(model, press):
        ids = torch.tensor([[5, 6, 7, 8]])
        kw = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 40, "min_new_tokens": 40, "do_sample": False,
              "past_key_values": DynamicCache(), "pad_token_id": 0}
        with torch.no_grad():
            if press is None:
                return model.generate(ids, **kw)
            with press(model):
                return model.generate(ids, **kw)

    reminders = []
    for limit, press in ((29, LazyStreamingPress(cap_total=16, slack=4)), (31, None)):  # distinct: warning_once
        logging.Logger.warning_once.cache_clear()  # once per process: an earlier run in this process saw it already
        model = tiny_model("llama")
        model.config.max_position_embeddings = limit
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="transformers"):
            assert generate(model, press).shape[1] == 44
        reminders.append([r for r in caplog.records if "predefined maximum length" in r.getMessage()])
    assert reminders[0] == [] and len(reminders[1]) == 1
# --- parameters, budgets and chunked prefill at their edges -------------------------------------------------
@pytest.mark.parametrize("params, message", [
    ({"window": 8, "n_sink": 1.5}, "lazy_streaming: n_sink=1.5 is invalid; it must be an integer >= 0."),
    ({"window": 8, "slack": "2"}, "lazy_streaming: slack='2' is invalid; it must be an integer >= 0."),
    ({"window": 3.5}, "lazy_streaming: window=3.5 is invalid; it must be an integer >= 1."),
    ({"window": 0}, "lazy_streaming: window=0 is invalid; it must be an integer >= 1."),
    ({"cap_total": 20.0}, "lazy_streaming: cap_total=20.0 must be an integer."),
    ({"cap_total": True}, "lazy_streaming: cap_total=True must be an integer."),
    ({"cap_total": 6, "n_sink": 4, "slack": 2},
     ("lazy_streaming: cap_total=6 is too small for n_sink=4 and slack=2: it must be >= n_sink + slack + 1 = 7 so "
     "that at least one recent token is kept.")),
    ({}, ("lazy_streaming: give exactly one of `window` (recent tokens kept after a compaction, >= 1) or `cap_total` "
         "(most tokens in the cache, >= n_sink + slack + 1); got window=None, cap_total=None.")),
])
def test_invalid_settings_messages(params, message):
    with pytest.raises(PressParameterError) as err:
        LazyStreamingPress(**params)
    assert str(err.value) == message


def test_smallest_valid_settings():
    p = LazyStreamingPress(cap_total=7, n_sink=4, slack=2)
    assert (p.recent, p.cap, p.max_cache) == (1, 5, 7)
    assert LazyStreamingPress(window=1, n_sink=0, slack=0).recent == 1


@pytest.mark.parametrize("ratio, length, params, expected", [
    (0.5, 100, {}, (4, 50, 6)),  # cap (1 - r) * length, slack an eighth of it
    (0.99, 100, {}, (4, 6, 1)),  # at least n_sink + 2 tokens, slack at least 1
    (0.95, 100, {"n_sink": 10}, (10, 12, 1)),
    (0.0, 64, {"slack": 5}, (4, 64, 5)),  # a given slack wins
    (0.25, 200, {}, (4, 150, 18)),
])
def test_from_compression_ratio(ratio, length, params, expected):
    p = LazyStreamingPress.from_compression_ratio(ratio, length, **params)
    assert (p.n_sink, p.cap_total, p.slack) == expected and p.window is None


def test_chunked_prefill_equals_one_forward_and_keeps_one_logit():
    model = tiny_model("llama")
    ids = torch.randint(4, 120, (1, 23), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model(input_ids=ids).logits[:, -1]
        for chunk_size in (1, 5, 23, 100):
            cache = DynamicCache()
            with apply_press(None, model):
                out = chunked_prefill(model, ids, cache, chunk_size)
            assert out.logits.shape == (1, 1, 128)
            torch.testing.assert_close(out.logits[:, -1], ref, atol=ATOL, rtol=ATOL)
            assert cache.get_seq_length() == 23 and next_position(cache) == 23
        out = chunked_prefill(model, ids, DynamicCache(), 10, logits_to_keep=3)
        assert out.logits.shape == (1, 3, 128)
        assert chunked_prefill(model, ids[:, :0], DynamicCache(), 4) is None
    with pytest.raises(PressParameterError) as err:
        chunked_prefill(model, ids, DynamicCache(), 0)
    assert str(err.value) == "chunked_prefill: chunk_size=0 must be >= 1."


def test_compaction_works_on_the_cache_device_not_the_default_device():
    """Compaction builds its shift on the keys' device: a run while another default device is set (as a CUDA
    model runs while the default is the CPU; "meta" stands in, no GPU needed) equals the plain run."""
    model = tiny_model("llama")
    ids = torch.randint(4, 120, (1, 40), generator=torch.Generator().manual_seed(8))
    runs = []
    for default in ("cpu", "meta"):
        cache = DynamicCache()
        with torch.no_grad(), torch.device(default), apply_press(LazyStreamingPress(window=8, slack=4), model):
            out = chunked_prefill(model, ids, cache, 5)
        runs.append((out.logits, cache.layers[0].keys))
        assert cache.get_seq_length() <= 16
    torch.testing.assert_close(runs[1][0], runs[0][0], atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(runs[1][1], runs[0][1], atol=ATOL, rtol=ATOL)
