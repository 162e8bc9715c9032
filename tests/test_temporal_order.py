"""TemporalOrderPress: the same entries kvpress's ScorerPress.compress keeps, left in the tokens' order, so that
compressing the same cache again (incremental perplexity, kvpress's DecodingPress) means what the press says.

Which token an entry holds is read from layer 0: its keys depend only on the token and its position, so each kept
key equals exactly one key of an uncompressed run. The expected sets are StreamingLLM's rule written out (the
``n_sink`` first tokens and the most recent ones), not our implementation.
"""

from __future__ import annotations

import pytest
import torch
from kvpress import DecodingPress, KnormPress, ScorerPress, SnapKVPress, StreamingLLMPress, TOVAPress
from transformers import DynamicCache

from kvpress_ext.core.apply import apply_press
from kvpress_ext.core.chunked_prefill import EveryChunkPress
from kvpress_ext.core.temporal_order import TemporalOrderPress, in_temporal_order
from kvpress_ext.presses.lazy_streaming import LazyStreamingPress
from kvpress_ext.testing import tiny_model


def _tokens_of_layer0(cache, reference_keys) -> torch.Tensor:
    """Per KV head, the token index of every entry of layer 0 (exact match with the uncompressed keys)."""
    keys = cache.layers[0].keys[0]  # heads x n x d
    distance = torch.cdist(keys, reference_keys[0], compute_mode="donot_use_mm_for_euclid_dist")  # heads x n x N
    assert bool((distance.min(-1).values < 1e-5).all()), "an entry matches no token"
    return distance.argmin(-1)


def _reference(model, ids):
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache)
    return cache.layers[0].keys


def _prefill(model, press, ids):
    cache = DynamicCache()
    with torch.no_grad(), apply_press(press, model):
        model(input_ids=ids, past_key_values=cache)
    return cache


@pytest.mark.parametrize("make", [lambda r: KnormPress(compression_ratio=r),
                                  lambda r: StreamingLLMPress(compression_ratio=r, n_sink=4),
                                  lambda r: SnapKVPress(compression_ratio=r, window_size=8),
                                  lambda r: TOVAPress(compression_ratio=r)],
                         ids=["knorm", "streaming_llm", "snapkv", "tova"])
def test_one_prefill_keeps_kvpress_entries_in_token_order(make):
    model = tiny_model("llama", layers=1, attn_implementation="eager")
    ids = torch.randint(4, 120, (1, 40), generator=torch.Generator().manual_seed(0))
    reference = _reference(model, ids)
    theirs = _tokens_of_layer0(_prefill(model, make(0.5), ids), reference)
    ours = _tokens_of_layer0(_prefill(model, TemporalOrderPress(press=make(0.0), compression_ratio=0.5), ids),
                             reference)
    assert ours.shape == theirs.shape == (reference.shape[1], 20)
    assert torch.equal(ours, theirs.sort(-1).values)  # the same entries, now in token order
    assert bool((ours.diff(dim=-1) > 0).all())


def test_streaming_llm_compressed_every_chunk_keeps_sinks_and_the_recent_window():
    """Incremental perplexity's wrapper: after every chunk, StreamingLLM's cache is the 4 first tokens and the most
    recent ones. kvpress alone (its score order) keeps other tokens from the second compression on."""
    model = tiny_model("llama", layers=1)
    ids = torch.randint(4, 120, (1, 96), generator=torch.Generator().manual_seed(1))
    reference = _reference(model, ids)

    def run(wrapper):
        cache, kept = DynamicCache(), []
        with torch.no_grad(), apply_press(wrapper, model):
            for start in range(0, 96, 16):
                model(input_ids=ids[:, start : start + 16], past_key_values=cache)
                kept.append(_tokens_of_layer0(cache, reference))
        return kept

    ours = run(EveryChunkPress(press=StreamingLLMPress(compression_ratio=0.5, n_sink=4)))
    for chunk, tokens in enumerate(ours):
        seen = 16 * (chunk + 1)
        n_kept = round(0.5 * seen)
        expected = torch.cat([torch.arange(4), torch.arange(seen - (n_kept - 4), seen)])
        assert all(torch.equal(row, expected) for row in tokens), (chunk, tokens[0].tolist())
    plain = EveryChunkPress(press=StreamingLLMPress(compression_ratio=0.5, n_sink=4), keep_fraction_of_seen=True)
    plain.press = plain.press.press  # kvpress's own compress: entries in score order
    theirs = run(plain)
    assert any(not torch.equal(a.sort(-1).values, b) for a, b in zip(theirs, ours))


def test_decoding_press_around_streaming_llm_keeps_sinks_and_the_recent_window():
    model = tiny_model("gpt_neox", layers=1)
    prompt = torch.randint(4, 120, (1, 12), generator=torch.Generator().manual_seed(2))
    press = DecodingPress(base_press=in_temporal_order(StreamingLLMPress(n_sink=4)), target_size=16,
                          compression_interval=6)
    cache, tokens = DynamicCache(), prompt
    with torch.no_grad(), apply_press(press, model):
        out = model(input_ids=prompt, past_key_values=cache)
        for _ in range(30):
            tok = out.logits[:, -1:].argmax(-1)
            tokens = torch.cat([tokens, tok], dim=1)
            out = model(input_ids=tok, past_key_values=cache)
    reference = _reference(model, tokens)
    kept = _tokens_of_layer0(cache, reference)
    seen = tokens.shape[1]
    n = kept.shape[-1]
    assert 16 <= n < 16 + 6
    expected = torch.cat([torch.arange(4), torch.arange(seen - (n - 4), seen)])
    assert all(torch.equal(row, expected) for row in kept), kept[0].tolist()


def test_wraps_plain_scorers_only():
    lazy = LazyStreamingPress(n_sink=2, cap_total=16, slack=2)
    assert in_temporal_order(lazy) is lazy
    wrapped = in_temporal_order(KnormPress(compression_ratio=0.25))
    assert isinstance(wrapped, TemporalOrderPress) and wrapped.compression_ratio == 0.25
    assert in_temporal_order(wrapped) is wrapped
    with pytest.raises(TypeError, match="ScorerPress"):
        TemporalOrderPress(press=lazy)


# --- the wrapper's contract, piece by piece (cases mutation testing asked for) ---------------------------------
class _Recording(ScorerPress):
    """A scorer that records what it is given: scores by descending token index, so it keeps the oldest tokens
    in reverse order (score order differs from token order)."""

    def __init__(self, compression_ratio=0.0):
        super().__init__(compression_ratio=compression_ratio)
        self.calls, self.models = [], []

    def post_init_from_model(self, model):
        self.models.append(model)

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        self.calls.append((module, hidden_states, keys, values, attentions, kwargs, self.compression_ratio))
        n = keys.shape[2]
        return (n - torch.arange(n, dtype=torch.float32)).expand(keys.shape[:3]).clone()


def test_passes_everything_to_the_inner_score_and_restores_its_ratio():
    inner = _Recording(compression_ratio=0.1)
    press = TemporalOrderPress(press=inner, compression_ratio=0.5)
    keys = torch.arange(2 * 2 * 8 * 3, dtype=torch.float32).view(2, 2, 8, 3)  # batch 2
    values, attentions, kwargs, hidden, module = keys + 1000, torch.ones(1), {"k": 1}, torch.zeros(2, 8, 4), object()
    k, v = press.compress(module, hidden, keys, values, attentions, kwargs)
    (m, h, kk, vv, a, kw, ratio_seen), = inner.calls
    assert m is module and h is hidden and kk is keys and vv is values and a is attentions and kw is kwargs
    assert ratio_seen == 0.5 and inner.compression_ratio == 0.1  # its own ratio while scoring, restored after
    assert torch.equal(k, keys[:, :, :4]) and torch.equal(v, values[:, :, :4])  # oldest four, in token order
    press.post_init_from_model("the model")
    assert inner.models == ["the model"]


def test_ratio_zero_is_the_identity_and_does_not_score():
    inner = _Recording()
    keys = torch.randn(1, 2, 6, 3)
    values = keys + 1
    k, v = TemporalOrderPress(press=inner, compression_ratio=0.0).compress(None, None, keys, values, None, {})
    assert k is keys and v is values and not inner.calls


def test_a_scorer_with_its_own_compress_is_not_wrapped():
    class OwnCompress(KnormPress):
        def compress(self, module, hidden_states, keys, values, attentions, kwargs):
            return keys, values

    own = OwnCompress(compression_ratio=0.5)
    assert in_temporal_order(own) is own
    with pytest.raises(TypeError, match="OwnCompress"):
        TemporalOrderPress(press=own)
    with pytest.raises(TypeError, match="LazyStreamingPress"):
        TemporalOrderPress(press=LazyStreamingPress(n_sink=2, cap_total=16, slack=2))


def test_keep_token_order_reaches_every_press_of_kvpress_wrappers():
    from kvpress import ComposedPress, PrefillDecodingPress

    from kvpress_ext.core.temporal_order import keep_token_order

    prefill = KnormPress(compression_ratio=0.5)
    decoding = DecodingPress(base_press=StreamingLLMPress(), target_size=32, compression_interval=8)
    both = keep_token_order(PrefillDecodingPress(prefilling_press=prefill, decoding_press=decoding))
    assert isinstance(both.prefilling_press, TemporalOrderPress) and both.prefilling_press.press is prefill
    assert both.decoding_press is decoding and isinstance(decoding.base_press, TemporalOrderPress)
    composed = keep_token_order(ComposedPress(presses=[KnormPress(compression_ratio=0.5), decoding]))
    assert isinstance(composed.presses[0], TemporalOrderPress) and composed.presses[1] is decoding
    lazy = LazyStreamingPress(n_sink=2, cap_total=16, slack=2)
    assert keep_token_order(lazy) is lazy


def test_snapkv_every_chunk_at_half_keeps_only_its_window_after_the_first_chunk():
    """The claim in docs/results/longcontext.md (2c): with chunks twice SnapKV's window, ratio 0.5 keeps exactly
    the window after the first chunk, so the text's first tokens (the attention sinks) leave the cache."""
    model = tiny_model("llama", layers=1)
    ids = torch.randint(4, 120, (1, 32), generator=torch.Generator().manual_seed(3))
    reference = _reference(model, ids)
    cache = DynamicCache()
    with torch.no_grad(), apply_press(EveryChunkPress(press=SnapKVPress(compression_ratio=0.5, window_size=8)), model):
        model(input_ids=ids[:, :16], past_key_values=cache)
    kept = _tokens_of_layer0(cache, reference)
    assert all(torch.equal(row, torch.arange(8, 16)) for row in kept)
