"""Adapters and RoPE arithmetic against what the models themselves compute."""

import pytest
import torch
from transformers import DynamicCache

from kvpress_ext import UnsupportedModelError, apply_press, get_adapter, get_press
from kvpress_ext.core.adapters.gpt_neox import CacheBasisView, neox_view_permutation
from kvpress_ext.testing import attention_inputs

TOL = 1e-5


def _layer0_inputs(model, ids, layer=0):
    """Hidden states entering layer ``layer``'s attention (after its input norm)."""
    adapter = get_adapter(model)
    cache = DynamicCache()
    with torch.no_grad(), attention_inputs(model, layers=[layer]) as inputs:
        model(input_ids=ids, past_key_values=cache)
    return adapter, adapter.attention_modules(model)[layer], inputs[layer][0], cache


@pytest.mark.parametrize("layer", [0, 1])  # Gemma 3: a sliding-window layer (base 1e4), a full one (base 1e6)
def test_prerope_keys_plus_apply_rope_equal_the_cached_keys(arch_model, layer):
    _, model = arch_model
    ids = torch.randint(3, 100, (1, 12))
    adapter, attn, hidden, cache = _layer0_inputs(model, ids, layer)
    keys = adapter.apply_rope(model, adapter.prerope_keys(attn, hidden), torch.arange(12), layer=layer)
    torch.testing.assert_close(keys, cache.layers[layer].keys, atol=TOL, rtol=TOL)
    values = adapter.values(attn, hidden)
    torch.testing.assert_close(values, cache.layers[layer].values, atol=TOL, rtol=TOL)
    shape = adapter.shape(model)
    assert keys.shape[1] == shape.num_kv_heads and keys.shape[-1] == shape.head_dim
    assert adapter.prerope_queries(attn, hidden).shape[1] == shape.num_heads


@pytest.mark.parametrize("layer", [0, 1])
def test_rerotated_keys_equal_keys_computed_at_the_new_positions(arch_model, layer):
    """Rotation by (q - p) of a key cached at p equals RoPE at q (full rotary, GPT-NeoX's partial rotary, and
    each Gemma 3 layer with its own base)."""
    arch, model = arch_model
    ids = torch.randint(3, 100, (1, 20))
    adapter, attn, hidden, cache = _layer0_inputs(model, ids, layer)
    old = torch.arange(20)
    new = torch.tensor([0, 1, 2, 3] + list(range(4, 20)))[torch.randperm(20)] * 37 + 5  # arbitrary targets
    moved = adapter.rerotate_keys(model, cache.layers[layer].keys, old, new, layer=layer)
    direct = adapter.apply_rope(model, adapter.prerope_keys(attn, hidden), new, layer=layer)
    torch.testing.assert_close(moved, direct, atol=1e-4, rtol=1e-4)
    if arch == "gpt_neox":
        assert adapter.shape(model).rotary_dim < adapter.shape(model).head_dim  # partial rotary really exercised


def test_gemma3_layers_rotate_with_their_own_base(tiny_models):
    """The two layer kinds really differ (so the per-layer tests above can fail), and a RoPE call without a
    layer is refused rather than guessed."""
    model = tiny_models["gemma3"]
    adapter = get_adapter(model)
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    assert not torch.allclose(adapter.inv_freq(model, 0), adapter.inv_freq(model, 1))
    x = torch.randn(1, 2, 5, 16, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(5) + 100
    assert not torch.allclose(adapter.apply_rope(model, x, pos, layer=0), adapter.apply_rope(model, x, pos, layer=1))
    with pytest.raises(ValueError, match="pass layer="):
        adapter.apply_rope(model, x, pos)


def test_unsupported_model_names_supported_families_and_the_fix():
    class FakeConfig:
        model_type = "bloom"

    class Fake(torch.nn.Module):
        config = FakeConfig()

    with pytest.raises(UnsupportedModelError, match=r"gpt_neox.*llama.*plugin"):
        get_adapter(Fake())


def test_neox_press_view_preserves_attention_scores(tiny_models):
    """The permuted basis that kvpress presses see on GPT-NeoX gives the model's own q.k scores."""
    model = tiny_models["gpt_neox"]
    ids = torch.randint(3, 100, (1, 10))
    adapter, attn, hidden, cache = _layer0_inputs(model, ids)
    view = adapter.press_view(model, attn)
    pos = torch.arange(10)
    # What a kvpress press does: q_proj -> view, rotate-half RoPE over the whole head with the view's tables.
    q_view = view.q_proj(hidden).view(1, 10, -1, view.head_dim).transpose(1, 2)
    cos, sin = view.rotary_emb(hidden, pos.unsqueeze(0))
    from transformers.models.llama.modeling_llama import rotate_half

    q_view = q_view * cos.unsqueeze(1) + rotate_half(q_view) * sin.unsqueeze(1)
    k_view = CacheBasisView(cache, neox_view_permutation(view.head_dim, attn.rotary_ndims)).layers[0].keys
    scores_view = q_view @ k_view.transpose(-1, -2)
    q = adapter.apply_rope(model, adapter.prerope_queries(attn, hidden), pos, layer=0)
    torch.testing.assert_close(scores_view, q @ cache.layers[0].keys.transpose(-1, -2), atol=1e-4, rtol=1e-4)


def test_neox_basis_view_writes_back_in_the_model_basis(tiny_models):
    model = tiny_models["gpt_neox"]
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.randint(3, 100, (1, 8)), past_key_values=cache)
    original = cache.layers[0].keys.clone()
    view = CacheBasisView(cache, neox_view_permutation(16, 4))
    layer = view.layers[0]
    layer.keys = layer.keys[:, :, :5]
    torch.testing.assert_close(cache.layers[0].keys, original[:, :, :5])


def test_apply_press_leaves_no_hooks_behind(tiny_models):
    model = tiny_models["gpt_neox"]
    adapter = get_adapter(model)
    before = [len(m._forward_hooks) for m in adapter.attention_modules(model)]
    with apply_press(get_press("knorm", compression_ratio=0.5), model):
        assert all(len(m._forward_hooks) > b for m, b in zip(adapter.attention_modules(model), before))
    assert [len(m._forward_hooks) for m in adapter.attention_modules(model)] == before
