"""Gemma 3 on the tiny random model: presses compress the full-attention layers only, the sliding-window layers keep
every token and follow moved positions, attention masks follow each layer kind's own cache length, and kvpress's
own Gemma 3 rule leaves the same caches."""

from __future__ import annotations

import copy

import pytest
import torch
from kvpress import KeyRerotationPress, KnormPress
from kvpress.presses import base_press
from transformers import DynamicCache, Gemma3ForCausalLM, Gemma3ForConditionalGeneration

from kvpress_ext import UnsupportedModelError, apply_press, get_adapter, get_press
from kvpress_ext.core.adapters.gemma3 import Gemma3Adapter
from kvpress_ext.core.positions import next_position
from kvpress_ext.runtime.pipeline import greedy_decode
from kvpress_ext.storage.cache_files import load_cache, save_cache
from kvpress_ext.testing import GEMMA3_TINY_WINDOW, attention_inputs, tiny_model

CONTEXT = 40  # past the 16-token window


def _ids(n, seed=0):
    return torch.randint(4, 120, (1, n), generator=torch.Generator().manual_seed(seed))


def _prefill(model, press, ids, cache=None):
    cache = DynamicCache() if cache is None else cache
    with torch.no_grad(), apply_press(press, model):
        get_adapter(model).decoder(model)(input_ids=ids, past_key_values=cache)
    return cache


@pytest.fixture(scope="module")
def gemma():
    return tiny_model("gemma3", layers=4)  # sliding, full, sliding, full


#: kvpress presses whose prefill kvpress 0.5.5 runs on Gemma 3 (ExpectedAttention calls the rotary embedding
#: without the layer type transformers 5 needs, and fails there).
KVPRESS_ON_GEMMA = ["knorm", "snapkv", "streaming_llm", "tova", "random", "observed_attention"]


@pytest.mark.parametrize("name", KVPRESS_ON_GEMMA)
def test_caches_equal_kvpress_under_its_gemma3_rule(name, gemma, monkeypatch):
    """kvpress skips sliding-window layers on Gemma3ForConditionalGeneration; applied to the text-only class (its
    class check widened), its prefill leaves exactly our cache: full layers compressed alike, sliding ones whole."""
    kw = {"window_size": 4} if name == "snapkv" else {}
    model = gemma if name != "observed_attention" else tiny_model("gemma3", layers=4, attn_implementation="eager")
    ids = _ids(CONTEXT)
    ours = _prefill(model, get_press(name, compression_ratio=0.5, **kw), ids)
    monkeypatch.setattr(base_press, "Gemma3ForConditionalGeneration",
                        (Gemma3ForConditionalGeneration, Gemma3ForCausalLM))
    theirs = DynamicCache()
    torch.manual_seed(0)
    with torch.no_grad(), get_press(name, compression_ratio=0.5, **kw)(model):
        model.model(input_ids=ids, past_key_values=theirs)
    lengths = [layer.keys.shape[-2] for layer in ours.layers]
    assert lengths == [CONTEXT, CONTEXT // 2, CONTEXT, CONTEXT // 2]
    if name == "random":  # seeded differently; the shape of the rule is what is compared
        assert lengths == [layer.keys.shape[-2] for layer in theirs.layers]
        return
    for a, b in zip(ours.layers, theirs.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=0, rtol=0)
        torch.testing.assert_close(a.values, b.values, atol=0, rtol=0)


def test_a_question_after_compression_sees_each_layer_kind_through_its_own_mask(gemma):
    """After the full layers were compressed (40 -> 20) and the sliding ones kept 40, a 12-token question in one
    forward gives the logits of feeding it token by token to the plain model (one query needs no mask on full layers,
    and the model's own sliding mask is right then): each kind of layer got a mask of its own cache length."""
    cache = _prefill(gemma, get_press("streaming_llm", compression_ratio=0.5), _ids(CONTEXT))
    question = _ids(12, seed=1)
    reference_cache = copy.deepcopy(cache)
    with torch.no_grad(), apply_press(None, gemma):
        logits = gemma(input_ids=question, past_key_values=cache).logits[0]
    with torch.no_grad():
        steps = [gemma(input_ids=question[:, i : i + 1], past_key_values=reference_cache).logits[0, 0]
                 for i in range(12)]
    torch.testing.assert_close(logits, torch.stack(steps), atol=1e-4, rtol=1e-4)


def test_model_generate_under_a_press_matches_the_greedy_loop(gemma):
    """transformers' generate makes its own cache (sliding layers bounded to the window) and masks; under the press
    it decodes the same tokens as kvpress-ext's loop on a plain cache."""
    ids = _ids(CONTEXT)
    press = get_press("snapkv", compression_ratio=0.5, window_size=4)
    with torch.no_grad(), apply_press(press, gemma):
        generated = gemma.generate(ids, max_new_tokens=12, do_sample=False)[0, CONTEXT:].tolist()
    cache = DynamicCache()
    with torch.no_grad(), apply_press(get_press("snapkv", compression_ratio=0.5, window_size=4), gemma):
        first = int(gemma(input_ids=ids, past_key_values=cache).logits[0, -1].argmax())
    assert cache.layers[1].keys.shape[-2] == CONTEXT // 2
    with torch.no_grad(), apply_press(None, gemma):
        ours = [first] + greedy_decode(gemma, torch.tensor([[first]]), cache, 11)
    assert generated == ours


def _check_keys_at_shifted_positions(model, captured, cache, compressed_positions=None):
    """Sliding layers: every token, rotated to (stream index + the shift the press made); compressed layers: the
    given positions when known."""
    adapter = get_adapter(model)
    seen = sum(h.shape[1] for h in captured[0])
    shift = next_position(cache) - seen
    for i, (layer, module) in enumerate(zip(cache.layers, adapter.attention_modules(model))):
        if i in adapter.compressed_layers(model):
            continue
        with torch.no_grad():
            pre = adapter.prerope_keys(module, torch.cat(captured[i], dim=1))
        expected = adapter.apply_rope(model, pre, torch.arange(seen) + shift, layer=i)
        torch.testing.assert_close(layer.keys, expected, atol=1e-4, rtol=1e-4)
    return shift


@pytest.mark.parametrize("name", ["rkv", "key_rerotation"])
def test_presses_that_move_positions_shift_the_sliding_layers_with_them(name, gemma):
    """R-KV (key rotation on, compressing while decoding) and kvpress's KeyRerotationPress set the next position
    below the tokens seen: the sliding layers' keys are rotated by the same shift, each with its own RoPE base."""
    press = (get_press("rkv", budget=16, window_size=4, compression_interval=4, rotate_keys=True) if name == "rkv"
             else KeyRerotationPress(press=KnormPress(compression_ratio=0.5)))
    cache = DynamicCache()
    with attention_inputs(gemma) as captured, torch.no_grad(), apply_press(press, gemma):
        gemma.model(input_ids=_ids(CONTEXT), past_key_values=cache)
        if name == "rkv":
            greedy_decode(gemma, _ids(1, seed=2), cache, 10)
    shift = _check_keys_at_shifted_positions(gemma, captured, cache)
    assert shift < 0


def test_lazy_streaming_keeps_the_sliding_window_exact(gemma):
    """Lazy streaming over 120 tokens (full layers capped at 24, positions compacted) gives, in the sliding layers,
    the logits the sliding window alone would: the last token's prediction needs only the last 16 tokens there, so
    shifting them keeps those layers exact."""
    press = get_press("lazy_streaming", n_sink=2, cap_total=24, slack=4)
    ids = _ids(120, seed=3)
    cache = DynamicCache()
    with attention_inputs(gemma) as captured, torch.no_grad(), apply_press(press, gemma):
        for start in range(0, 120, 4):
            gemma.model(input_ids=ids[:, start : start + 4], past_key_values=cache)
    assert cache.layers[1].keys.shape[-2] <= 24 and cache.layers[0].keys.shape[-2] == 120
    assert _check_keys_at_shifted_positions(gemma, captured, cache) < 0
    assert GEMMA3_TINY_WINDOW < 24


def test_saved_compressed_cache_continues_alike(gemma, tmp_path):
    """A cache whose layers hold different lengths (full compressed, sliding whole) saves, loads and continues with
    the same logits as the live one."""
    ids = _ids(CONTEXT)
    cache = _prefill(gemma, get_press("knorm", compression_ratio=0.5), ids)
    save_cache(cache, tmp_path / "c", model=gemma, token_ids=ids[0].tolist())
    loaded, _ = load_cache(tmp_path / "c", model=gemma)
    assert [layer.keys.shape[-2] for layer in loaded.layers] == [CONTEXT, CONTEXT // 2, CONTEXT, CONTEXT // 2]
    question = _ids(6, seed=4)
    with torch.no_grad(), apply_press(None, gemma):
        a = gemma(input_ids=question, past_key_values=cache).logits
        b = gemma(input_ids=question, past_key_values=loaded).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_presses_that_run_the_model_themselves_are_refused(gemma):
    """Finch hooks every layer itself (not our sliding-layer rule): one error naming the fix."""
    with pytest.raises(UnsupportedModelError, match="Llama-family"):
        _prefill(gemma, get_press("finch", compression_ratio=0.5), _ids(CONTEXT))


def test_the_adapter_drives_gemma3_text_models_with_qk_norms():
    adapter = Gemma3Adapter()
    assert (adapter.name, adapter.model_types, adapter.qk_norm) == ("gemma3", ("gemma3_text",), True)
    assert type(get_adapter(tiny_model("gemma3", layers=2))) is Gemma3Adapter


def test_rope_tables_are_each_layer_kinds_own(gemma):
    """position_embeddings (A³'s recompute) gives the model's own table of the layer's type: two bases differ."""
    adapter, rotary = get_adapter(gemma), gemma.model.rotary_emb
    x = torch.randn(1, 5, 64)
    pos = torch.tensor([[0, 3, 7, 20, 41]])
    for layer, kind in enumerate(gemma.config.layer_types):
        cos, sin = adapter.position_embeddings(gemma, layer, x, pos)
        ref_cos, ref_sin = rotary(x, pos, kind)
        torch.testing.assert_close(cos, ref_cos, atol=0, rtol=0)
        torch.testing.assert_close(sin, ref_sin, atol=0, rtol=0)
        assert cos.dtype == x.dtype and cos.shape == (1, 5, 16)
    sliding, full = (adapter.position_embeddings(gemma, i, x, pos)[0] for i in (0, 1))
    assert not torch.allclose(sliding, full)


def test_a_press_view_keeps_the_rotary_of_its_layer_kind_once_set(gemma):
    adapter = get_adapter(gemma)
    attn = adapter.attention(adapter.layers(gemma)[1])
    first = adapter.press_view(gemma, attn).rotary_emb
    assert first.layer_type == "full_attention"
    assert adapter.press_view(gemma, attn).rotary_emb is first  # built once, then kept


def test_a_press_view_replaces_the_shared_rotary_a_kvpress_press_left_on_the_module():
    """kvpress's BasePress.__call__ sets the model's all-types rotary embedding as a submodule of each attention
    module: the view replaces it with its layer's own, and the shared one is no longer registered there."""
    model = tiny_model("gemma3", layers=2)
    adapter = get_adapter(model)
    attn = adapter.attention(adapter.layers(model)[0])
    attn.rotary_emb = model.model.rotary_emb
    assert "rotary_emb" in dict(attn.named_children())
    view = adapter.press_view(model, attn)
    assert view.rotary_emb.layer_type == "sliding_attention"
    assert "rotary_emb" not in dict(attn.named_children())


def test_rope_without_a_layer_is_refused_naming_the_fix(gemma):
    with pytest.raises(ValueError, match=r"^Gemma 3 rotates each layer type with its own RoPE base: pass layer= to "
                                         r"the adapter's RoPE methods\.$"):
        get_adapter(gemma).inv_freq(gemma)


def test_masks_by_layer_kind_are_made_on_the_inputs_device(gemma):
    """With another default device set (as a CUDA model runs while the default is the CPU; "meta" stands in), the
    question after compression gives the logits of a run without it."""
    cache = _prefill(gemma, get_press("streaming_llm", compression_ratio=0.5), _ids(CONTEXT))
    question = _ids(5, seed=2)
    other = copy.deepcopy(cache)
    with torch.no_grad(), apply_press(None, gemma):
        ref = gemma(input_ids=question, past_key_values=cache).logits
        with torch.device("meta"):
            out = gemma(input_ids=question, past_key_values=other).logits
    assert out.device.type == "cpu"
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
