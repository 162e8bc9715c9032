"""GPT-NeoX adapter (Pythia): fused ``query_key_value`` projection and partial rotary (``rotary_pct``).

How kvpress's presses run on GPT-NeoX without editing kvpress or patching it globally
----------------------------------------------------------------------------------------
kvpress presses assume a Llama-shaped attention module: ``q_proj``/``k_proj``, ``config.num_key_value_heads``,
``head_dim``, ``rotary_emb`` and RoPE by rotate-half over the *whole* head. GPT-NeoX rotates only the
first ``rotary_ndims`` dimensions of a head, pairing dimension i with i + rotary_ndims/2.

The adapter hands each press a :class:`NeoXPressView` instead of the real module, and shows it keys and
RoPE tables in a *permuted head basis*: dimensions are reordered so that NeoX's rotary pairs
(i, i + r/2) land on Llama's pairs (i, i + D/2), and the pass-through dimensions fill the remaining
slots with cos = 1 and sin = 0. A permutation applied to both queries and keys leaves every dot
product unchanged, so attention scores a press computes in that basis are exactly the model's; keys a
press writes back (gathered, re-rotated) are permuted back before they reach the cache.
Only objects handed to the press are wrapped: the model, kvpress and code that never imported
kvpress_ext are untouched.
"""

from __future__ import annotations

import functools
import weakref
from types import SimpleNamespace

import torch
from torch import nn

from kvpress_ext.core import rope
from kvpress_ext.core.adapters.base import AttentionShape, ModelAdapter


@functools.cache  # called per layer per forward: build each permutation once
def neox_view_permutation(head_dim: int, rotary_dim: int) -> torch.Tensor:
    """``perm[v]`` = NeoX dimension shown at view dimension ``v`` (see the module docstring)."""
    h, r = head_dim // 2, rotary_dim // 2
    pass_dims = list(range(rotary_dim, head_dim))
    first, second = pass_dims[: len(pass_dims) // 2], pass_dims[len(pass_dims) // 2 :]
    perm = list(range(r)) + first + list(range(r, rotary_dim)) + second
    assert len(perm) == head_dim and perm[h] == r
    return torch.tensor(perm, dtype=torch.long)


class _ViewRotary:
    """A rotary embedding over the whole (permuted) head: zero frequency on pass-through dimensions.

    ``inv_freq`` is padded with zeros (a rotation by a position difference leaves pass-through dims alone);
    the tables carry the model's ``attention_scaling`` on the rotary dims only, as the model's own RoPE does.
    """

    def __init__(self, inv_freq: torch.Tensor, head_dim: int, scaling: float):
        pad = torch.zeros(head_dim // 2 - inv_freq.shape[-1], dtype=inv_freq.dtype, device=inv_freq.device)
        self.inv_freq = torch.cat([inv_freq, pad])
        self.rotary_half = inv_freq.shape[-1]
        self.head_dim = head_dim
        self.attention_scaling = scaling

    def __call__(self, x: torch.Tensor, position_ids: torch.Tensor):
        inv_freq = self.inv_freq[: self.rotary_half].to(x.device)
        cos, sin = rope.cos_sin(position_ids.to(x.device), inv_freq, self.attention_scaling)
        cos, sin = _view_position_embeddings(cos, sin, self.head_dim)
        return cos.to(x.dtype), sin.to(x.dtype)


class _LayerView:
    """One cache layer with keys shown in the view basis; writes are mapped back."""

    def __init__(self, layer, perm, inv_perm):
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "_perm", perm)
        object.__setattr__(self, "_inv", inv_perm)

    @property
    def keys(self):
        k = self._layer.keys
        return k[..., self._perm.to(k.device)] if isinstance(k, torch.Tensor) and k.numel() else k

    @keys.setter
    def keys(self, value):
        self._layer.keys = value[..., self._inv.to(value.device)] if value.numel() else value

    def __getattr__(self, name):
        return getattr(self._layer, name)

    def __setattr__(self, name, value):
        if name == "keys":
            object.__setattr__(self, name, value)  # goes through the property
        else:
            setattr(self._layer, name, value)


class CacheBasisView:
    """A cache whose ``layers[i].keys`` are in the press view basis; everything else is the real cache."""

    def __init__(self, cache, perm: torch.Tensor):
        self._cache = cache
        self._perm = perm
        self._inv = torch.argsort(perm)

    @property
    def layers(self):
        return [_LayerView(layer, self._perm, self._inv) for layer in self._cache.layers]

    def __getattr__(self, name):
        return getattr(self._cache, name)

    def __len__(self):
        return len(self._cache)


class NeoXPressView:
    """A GPT-NeoX attention module dressed as a Llama one, in the permuted basis, for kvpress presses.

    Attribute writes other than its own (e.g. AdaKV's ``masked_key_indices``) go to the real module,
    so kvpress's attention patch sees them.
    """

    _own = ("_module", "config", "head_dim", "layer_idx", "rotary_emb", "num_key_value_groups", "perm")

    def __init__(self, module: nn.Module, model_config, rotary_emb: _ViewRotary, perm: torch.Tensor):
        d = module.head_size
        cfg = SimpleNamespace(**{k: v for k, v in model_config.to_dict().items() if not k.startswith("_")})
        cfg.num_key_value_heads = model_config.num_attention_heads
        cfg.head_dim = d
        for name, value in {
            "_module": module, "config": cfg, "head_dim": d, "layer_idx": module.layer_idx, "rotary_emb": rotary_emb,
            "num_key_value_groups": 1, "perm": perm,
        }.items():
            object.__setattr__(self, name, value)

    def _qkv(self, hidden_states):
        bsz, seq, _ = hidden_states.shape
        return self._module.query_key_value(hidden_states).view(bsz, seq, -1, 3 * self.head_dim)

    def q_proj(self, hidden_states):
        q = self._qkv(hidden_states)[..., : self.head_dim][..., self.perm.to(hidden_states.device)]
        return q.flatten(-2)

    def k_proj(self, hidden_states):
        k = self._qkv(hidden_states)[..., self.head_dim : 2 * self.head_dim][..., self.perm.to(hidden_states.device)]
        return k.flatten(-2)

    def v_proj(self, hidden_states):
        return self._qkv(hidden_states)[..., 2 * self.head_dim :].flatten(-2)

    @property
    def o_proj(self):
        return self._module.dense

    def __getattr__(self, name):
        return getattr(self._module, name)

    def __setattr__(self, name, value):
        if name in self._own:
            object.__setattr__(self, name, value)
        else:
            setattr(self._module, name, value)


class GPTNeoXAdapter(ModelAdapter):
    """Pythia and other GPT-NeoX models: ``model.gpt_neox``, ``layer.attention``, fused qkv per head."""

    name = "gpt_neox"
    model_types = ("gpt_neox",)

    def __init__(self):
        self._views: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def decoder(self, model):
        return model if hasattr(model, "layers") else model.gpt_neox

    def attention(self, layer):
        return layer.attention

    def shape(self, model):
        cfg = model.config
        d = cfg.hidden_size // cfg.num_attention_heads
        return AttentionShape(cfg.num_attention_heads, cfg.num_attention_heads, d, 2 * self.inv_freq(model).shape[-1])

    def _split_qkv(self, module, hidden_states):
        bsz, seq, _ = hidden_states.shape
        qkv = module.query_key_value(hidden_states).view(bsz, seq, -1, 3 * module.head_size).transpose(1, 2)
        return qkv.chunk(3, dim=-1)

    def prerope_queries(self, module, hidden_states):
        return self._split_qkv(module, hidden_states)[0]

    def prerope_keys(self, module, hidden_states):
        return self._split_qkv(module, hidden_states)[1]

    def values(self, module, hidden_states):
        return self._split_qkv(module, hidden_states)[2]

    def _perm(self, module):
        return neox_view_permutation(module.head_size, module.rotary_ndims)

    def press_view(self, model, module):
        view = self._views.get(module)
        if view is None:
            rot = self.rotary_embedding(model)
            view_rotary = _ViewRotary(rot.inv_freq, module.head_size, float(getattr(rot, "attention_scaling", 1.0)))
            view = NeoXPressView(module, model.config, view_rotary, self._perm(module))
            self._views[module] = view
        return view

    def hook_kwargs(self, module, args, kwargs):
        out = super().hook_kwargs(module, args, kwargs)
        perm = self._perm(module)
        cache = out.pop("layer_past", None)
        if cache is not None:
            out["past_key_values"] = CacheBasisView(cache, perm)
        if out.get("position_embeddings") is not None:
            out["position_embeddings"] = _view_position_embeddings(*out["position_embeddings"], module.head_size)
        return out


def _view_position_embeddings(cos: torch.Tensor, sin: torch.Tensor, head_dim: int):
    """Natural (..., r) cos/sin -> (..., head_dim) tables in the view basis (1 and 0 on pass-through)."""
    r2 = cos.shape[-1] // 2
    h = head_dim // 2
    full_cos = torch.ones(*cos.shape[:-1], head_dim, dtype=cos.dtype, device=cos.device)
    full_sin = torch.zeros_like(full_cos)
    full_cos[..., :r2], full_cos[..., h : h + r2] = cos[..., :r2], cos[..., r2:]
    full_sin[..., :r2], full_sin[..., h : h + r2] = sin[..., :r2], sin[..., r2:]
    return full_cos, full_sin
