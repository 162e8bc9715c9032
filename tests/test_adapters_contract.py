"""The adapter interface against the models themselves: shapes, projections (attention outputs rebuilt from
them), RoPE with a model's attention scaling (YaRN), the GPT-NeoX press view, lookup and its errors."""

from __future__ import annotations

import types

import pytest
import torch
from kvpress import BasePress
from transformers import AutoModelForCausalLM, DynamicCache

from kvpress_ext import UnsupportedModelError, apply_press
from kvpress_ext.core import adapters as adapters_mod
from kvpress_ext.core import tables
from kvpress_ext.core.adapters import AttentionShape, ModelAdapter, add_adapter, get_adapter
from kvpress_ext.core.adapters.gpt_neox import GPTNeoXAdapter
from kvpress_ext.core.adapters.llama import LlamaFamilyAdapter
from kvpress_ext.core.tables import RegistrationConflict
from kvpress_ext.testing import ARCHITECTURES, tiny_config, tiny_model

TOL = 1e-5


def _yarn_model(arch, dtype=torch.float32):
    """A tiny model whose RoPE has an attention scaling != 1 (YaRN, factor 4)."""
    config = tiny_config(arch)
    rope = dict(config.rope_parameters)
    rope.update(rope_type="yarn", factor=4.0, original_max_position_embeddings=1024)
    config.rope_parameters = rope
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def _attention_io(model, ids, layer=0):
    """Layer ``layer``'s attention input (normed hidden states) and its output, from one forward."""
    adapter = get_adapter(model)
    attn = adapter.attention_modules(model)[layer]
    seen = {}

    def hook(module, args, kwargs, output):
        seen["h"] = kwargs.get("hidden_states", args[0] if args else None)
        seen["out"] = output[0]

    handle = attn.register_forward_hook(hook, with_kwargs=True)
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache)
    handle.remove()
    return adapter, attn, seen["h"], seen["out"], cache


def _attention_from_adapter(model, adapter, attn, hidden, layer=0):
    """Causal attention rebuilt from the adapter's pre-RoPE queries/keys, values, RoPE, softmax scale and sliding
    window; then the output projection. Equal to the module's output only if every piece is right (GQA by head
    groups)."""
    n = hidden.shape[1]
    pos = torch.arange(n)
    with torch.no_grad():
        q = adapter.apply_rope(model, adapter.prerope_queries(attn, hidden), pos, layer=layer)
        k = adapter.apply_rope(model, adapter.prerope_keys(attn, hidden), pos, layer=layer)
        v = adapter.values(attn, hidden)
        shape = adapter.shape(model)
        k, v = k.repeat_interleave(shape.num_groups, 1), v.repeat_interleave(shape.num_groups, 1)
        scores = q @ k.transpose(-1, -2) * adapter.softmax_scale(model, layer)
        hidden_keys = torch.ones(n, n, dtype=torch.bool).triu(1)
        window = adapter.sliding_window(model, layer)
        if window is not None:
            hidden_keys |= torch.ones(n, n, dtype=torch.bool).tril(-window)
        scores = scores.masked_fill(hidden_keys, float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, n, -1)
        proj = attn.o_proj if hasattr(attn, "o_proj") else attn.dense
        return proj(out)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("layer", [0, 1])
def test_attention_output_rebuilt_from_the_adapter(tiny_models, arch, layer):
    """40 tokens: past the tiny Gemma 3's 16-token window, so its sliding layer (0) really cuts keys off."""
    model = tiny_models[arch]
    ids = torch.randint(4, 120, (1, 40), generator=torch.Generator().manual_seed(0))
    adapter, attn, hidden, out, _ = _attention_io(model, ids, layer=layer)
    rebuilt = _attention_from_adapter(model, adapter, attn, hidden, layer)
    torch.testing.assert_close(rebuilt, out, atol=1e-4, rtol=1e-4)


def test_gemma3_scale_and_window_are_the_models_own(tiny_models):
    """The query scaling is query_pre_attn_scalar's, not head_dim's, and the window applies to sliding layers only:
    rebuilding Gemma 3's attention with either default gives another output."""
    model = tiny_models["gemma3"]
    ids = torch.randint(4, 120, (1, 40), generator=torch.Generator().manual_seed(0))
    adapter, attn, hidden, out, _ = _attention_io(model, ids, layer=0)
    assert adapter.softmax_scale(model, 0) == 24**-0.5 != adapter.shape(model).head_dim ** -0.5
    assert (adapter.sliding_window(model, 0), adapter.sliding_window(model, 1)) == (16, None)
    assert adapter.compressed_layers(model) == [1]
    plain = types.SimpleNamespace(**{k: getattr(adapter, k) for k in ("apply_rope", "prerope_queries",
                                                                       "prerope_keys", "values", "shape")})
    for softmax_scale, window in ((lambda m, i: 16**-0.5, lambda m, i: 16), (adapter.softmax_scale, lambda m, i: None)):
        plain.softmax_scale, plain.sliding_window = softmax_scale, window
        assert not torch.allclose(_attention_from_adapter(model, plain, attn, hidden, 0), out, atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_rope_with_attention_scaling(arch):
    """YaRN scales cos/sin: apply_rope must reproduce the cached keys, rerotate_keys must not scale twice, and
    the GPT-NeoX view's tables must equal the ones the model hands the press."""
    model = _yarn_model(arch)
    ids = torch.randint(4, 120, (1, 12), generator=torch.Generator().manual_seed(1))
    adapter, attn, hidden, out, cache = _attention_io(model, ids)
    scaling = adapter.attention_scaling(model)
    assert abs(scaling - 1.0) > 0.1
    with torch.no_grad():
        pre = adapter.prerope_keys(attn, hidden)
        keys = adapter.apply_rope(model, pre, torch.arange(12), layer=0)
        torch.testing.assert_close(keys, cache.layers[0].keys, atol=TOL, rtol=TOL)
        moved = adapter.rerotate_keys(model, keys, torch.arange(12), torch.arange(12) + 40, layer=0)
        torch.testing.assert_close(moved, adapter.apply_rope(model, pre, torch.arange(12) + 40, layer=0),
                                   atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_attention_from_adapter(model, adapter, attn, hidden), out, atol=1e-4, rtol=1e-4)
    if arch == "gpt_neox":
        view = GPTNeoXAdapter().press_view(model, attn)
        got = {}

        def hook(module, args, kwargs, output):
            got["pe"] = adapter.hook_kwargs(module, args, kwargs)["position_embeddings"]

        handle = attn.register_forward_hook(hook, with_kwargs=True)
        with torch.no_grad():
            model(input_ids=ids)
        handle.remove()
        cos, sin = view.rotary_emb(hidden, torch.arange(12)[None])
        torch.testing.assert_close(cos, got["pe"][0], atol=TOL, rtol=TOL)
        torch.testing.assert_close(sin, got["pe"][1], atol=TOL, rtol=TOL)


def test_attention_scaling_defaults_to_one_without_the_attribute():
    class Plain(ModelAdapter):
        def rotary_embedding(self, model):
            return types.SimpleNamespace(inv_freq=torch.ones(2))

    assert Plain().attention_scaling(None) == 1.0


def test_shapes_and_qwen3_head_dim_that_is_not_hidden_over_heads():
    neox = GPTNeoXAdapter().shape(tiny_model("gpt_neox"))
    assert neox == AttentionShape(4, 4, 16, 4) and all(isinstance(x, int) for x in vars(neox).values())
    assert get_adapter(tiny_model("llama")).shape(tiny_model("llama")) == AttentionShape(4, 2, 16, 16)
    qwen2 = tiny_model("qwen2")  # its config has no head_dim: hidden // heads
    shape = get_adapter(qwen2).shape(qwen2)
    assert shape == AttentionShape(4, 2, 16, 16) and all(isinstance(x, int) for x in vars(shape).values())
    config = tiny_config("qwen3")
    config.head_dim = 8
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert get_adapter(model).shape(model) == AttentionShape(4, 2, 8, 8)
    ids = torch.randint(4, 120, (1, 7), generator=torch.Generator().manual_seed(2))
    adapter, attn, hidden, out, _ = _attention_io(model, ids)
    torch.testing.assert_close(_attention_from_adapter(model, adapter, attn, hidden), out, atol=1e-4, rtol=1e-4)


def test_freshly_built_adapters_drive_their_models():
    """Adapters as a plugin would build them (not the ones registered at start-up)."""
    for adapter, arch in ((LlamaFamilyAdapter("qwen3", ("qwen3",), qk_norm=True), "qwen3"),
                          (GPTNeoXAdapter(), "gpt_neox")):
        model = tiny_model(arch)
        ids = torch.randint(4, 120, (1, 6), generator=torch.Generator().manual_seed(3))
        _, attn, hidden, out, _ = _attention_io(model, ids)
        torch.testing.assert_close(_attention_from_adapter(model, adapter, attn, hidden), out, atol=1e-4, rtol=1e-4)
        if arch == "gpt_neox":
            assert adapter.press_view(model, attn) is adapter.press_view(model, attn)  # built once per module


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_decoder_of_the_backbone_itself(tiny_models, arch):
    model = tiny_models[arch]
    adapter = get_adapter(model)
    backbone = adapter.decoder(model)
    assert backbone is not model and adapter.decoder(backbone) is backbone
    assert adapter.layers(backbone) == adapter.layers(model)


def test_press_view_keeps_a_modules_own_rotary_embedding(tiny_models):
    model = tiny_models["llama"]
    adapter = get_adapter(model)
    attn = adapter.attention_modules(model)[0]
    own = object()
    earlier = attn._modules.pop("rotary_emb", None)  # a submodule set by an earlier view in this process, if any
    previous = attn.__dict__.get("rotary_emb")
    attn.rotary_emb = own
    try:
        assert adapter.press_view(model, attn).rotary_emb is own
    finally:
        del attn.rotary_emb
        if previous is not None:
            attn.rotary_emb = previous
        if earlier is not None:
            attn._modules["rotary_emb"] = earlier
    assert adapter.press_view(model, attn).rotary_emb is adapter.rotary_embedding(model)


def test_neox_view_looks_like_a_llama_module(tiny_models):
    model = tiny_models["gpt_neox"]
    adapter = get_adapter(model)
    attn = adapter.attention_modules(model)[1]
    view = adapter.press_view(model, attn)
    assert view.layer_idx == 1 and view.head_dim == 16 and view.num_key_value_groups == 1
    assert view.config.num_key_value_heads == 4 and view.config.head_dim == 16
    assert view.config.num_attention_heads == 4 and view.query_key_value is attn.query_key_value
    hidden = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(4))  # a batch of 2
    with torch.no_grad():
        q, k, v = view.q_proj(hidden), view.k_proj(hidden), view.v_proj(hidden)
        assert q.shape == k.shape == v.shape == (2, 5, 64)
        perm = view.perm
        for ours, theirs in ((q, adapter.prerope_queries(attn, hidden)), (k, adapter.prerope_keys(attn, hidden))):
            torch.testing.assert_close(ours.view(2, 5, 4, 16).transpose(1, 2), theirs[..., perm])
        torch.testing.assert_close(v.view(2, 5, 4, 16).transpose(1, 2), adapter.values(attn, hidden))
    # tables follow the dtype of the input (a bf16 press works in bf16)
    cos, sin = view.rotary_emb(hidden.bfloat16(), torch.arange(5)[None])
    assert cos.dtype == sin.dtype == torch.bfloat16 and cos.shape == (1, 5, 16)


def test_neox_tables_handed_to_presses_keep_the_model_dtype():
    model = tiny_model("gpt_neox", dtype=torch.bfloat16)
    got = []

    class Recorder(BasePress):
        def forward_hook(self, module, args, kwargs, output):
            got.append(kwargs["position_embeddings"])
            return output

    with torch.no_grad(), apply_press(Recorder(), model):
        model(input_ids=torch.randint(4, 120, (1, 5)), past_key_values=DynamicCache())
    assert got and all(c.dtype == s.dtype == torch.bfloat16 for c, s in got)


def test_describe():
    assert GPTNeoXAdapter().describe() == "gpt_neox: model_type in gpt_neox"
    assert LlamaFamilyAdapter("x", ("a", "b")).describe() == "x: model_type in a, b"


def test_unsupported_models_get_the_full_message():
    supported = "gemma3_text, gpt_neox, llama, mistral, qwen2, qwen3"
    fix = ("To add one, subclass kvpress_ext.core.adapters.ModelAdapter and register an instance from a plugin's "
           "`kvpress_ext_register_adapters` hook (see README, 'Writing a plugin').")

    class NoConfig(torch.nn.Module):
        pass

    class NoModelType(torch.nn.Module):
        config = types.SimpleNamespace()

    class Bloom(torch.nn.Module):
        config = types.SimpleNamespace(model_type="bloom")

    for model, model_type in ((NoConfig(), "NoConfig"), (NoModelType(), "NoModelType"), (Bloom(), "bloom")):
        with pytest.raises(UnsupportedModelError) as err:
            get_adapter(model)
        assert str(err.value) == (f"No kvpress_ext adapter for model_type {model_type!r} ({type(model).__name__}). "
                                  f"Supported: {supported}. {fix}")


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_a_later_adapter_for_a_model_type_takes_precedence(monkeypatch, tiny_models, arch):
    get_adapter(tiny_models[arch])  # plugins loaded before the table is saved
    saved = adapters_mod._MODEL_TYPES.snapshot()
    try:
        mine = LlamaFamilyAdapter("my_llama", ("llama",)) if arch == "llama" else type(
            "MyNeoX", (GPTNeoXAdapter,), {"name": "my_neox"})()
        add_adapter(mine, override=True)
        assert get_adapter(tiny_models[arch]) is mine
    finally:
        adapters_mod._MODEL_TYPES.restore(saved)
    assert get_adapter(tiny_models[arch]) is not mine
    with pytest.raises(TypeError) as err:
        add_adapter(3)
    assert str(err.value) == "add_adapter needs a ModelAdapter instance (e.g. MyAdapter(), not the class), got 3"


def test_neox_view_built_under_another_default_device_stays_on_the_model_device(tiny_models):
    """A view built while torch's default device is another one (a CUDA model built while the default is the
    CPU; "meta" stands in) keeps its tables on the model's device and gives the same tables."""
    model = tiny_models["gpt_neox"]
    attn = get_adapter(model).attention_modules(model)[0]
    hidden = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(5))
    ref = GPTNeoXAdapter().press_view(model, attn).rotary_emb(hidden, torch.arange(5)[None])
    with torch.device("meta"):
        view = GPTNeoXAdapter().press_view(model, attn)
        cos, sin = view.rotary_emb(hidden, torch.arange(5, device="cpu")[None])
    assert view.rotary_emb.inv_freq.device.type == "cpu" and cos.device.type == sin.device.type == "cpu"
    torch.testing.assert_close(cos, ref[0])
    torch.testing.assert_close(sin, ref[1])


# --- what an adapter declares: the model types it matches, how it is named, what add_adapter refuses ---------------
def test_matches_reads_the_config_model_type_and_llama_adapters_have_no_qk_norm_by_default():
    adapter = LlamaFamilyAdapter("custom", ("custom_type",))
    assert adapter.qk_norm is False
    assert adapter.matches(types.SimpleNamespace(config=types.SimpleNamespace(model_type="custom_type")))
    assert not adapter.matches(types.SimpleNamespace(config=types.SimpleNamespace(model_type="other")))
    assert not adapter.matches(object())


def test_an_adapter_is_described_by_its_class_path_and_name():
    described = adapters_mod._adapter_path(LlamaFamilyAdapter("x", ("y",)))
    assert described == "kvpress_ext.core.adapters.llama.LlamaFamilyAdapter 'x'"


@pytest.mark.parametrize("model_types", [(), ("",), (3,), ("fine", "")])
def test_adapters_must_name_their_model_types(model_types):
    with pytest.raises(TypeError, match="must name the config.model_type values it drives in model_types"):
        add_adapter(LlamaFamilyAdapter("nameless", model_types))


def test_an_adapter_with_one_taken_model_type_registers_none():
    state = tables.snapshot_all()
    try:
        with pytest.raises(RegistrationConflict):
            add_adapter(LlamaFamilyAdapter("half", ("half_free_type", "llama")))
        assert "half_free_type" not in {e.key for e in adapters_mod.adapter_registrations()}
    finally:
        tables.restore_all(state)


class _ByArchitecture(LlamaFamilyAdapter):
    """An adapter with its own matches(): any config whose architectures name a Llama model."""

    def matches(self, model):
        return "LlamaForCausalLM" in (getattr(model.config, "architectures", None) or [])


def test_the_table_entry_wins_and_an_adapters_own_matches_is_the_fallback():
    state = tables.snapshot_all()
    try:
        first = LlamaFamilyAdapter("aaa_first", ("t_one", "t_two"))
        second = LlamaFamilyAdapter("bbb_second", ("t_one",))
        add_adapter(first)
        add_adapter(second, override=True)
        model_of = lambda t, **kw: types.SimpleNamespace(config=types.SimpleNamespace(model_type=t, **kw))
        assert get_adapter(model_of("t_one")) is second and get_adapter(model_of("t_two")) is first
        by_arch = _ByArchitecture("by_architecture", ("t_three",))
        add_adapter(by_arch)
        assert get_adapter(model_of("unregistered", architectures=["LlamaForCausalLM"])) is by_arch
        with pytest.raises(UnsupportedModelError):
            get_adapter(model_of("unregistered", architectures=["Other"]))
    finally:
        tables.restore_all(state)
