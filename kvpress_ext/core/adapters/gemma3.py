"""Gemma 3 adapter (``gemma3_text``): two kinds of layers, each with its own RoPE base.

Gemma 3 interleaves sliding-window layers (a query sees the last ``sliding_window`` tokens; RoPE base 10,000 in
the released models) with full-attention layers (RoPE base 1,000,000), five to one. Queries and keys go through
RMS norms before RoPE, and scores are scaled by ``query_pre_attn_scalar ** -0.5``, not ``head_dim ** -0.5``.

What presses do on sliding-window layers: **nothing**. Presses compress the full-attention layers only
(:meth:`Gemma3Adapter.compressed_layers`). A sliding layer already bounds what a query reads to its window, and
transformers' own cache for Gemma 3 keeps only that window there; evicting inside it would cut into the local
context every token relies on, for almost no memory (at 8k tokens the three full layers of Gemma 3 270M hold
8k entries each, the fifteen sliding ones 511). kvpress 0.5.5 applies the same rule to
``Gemma3ForConditionalGeneration`` (it logs "Compression in Gemma3 is only applied to layer without sliding window
attention"), but hooks every layer of the text-only ``Gemma3ForCausalLM``; on that class kvpress-ext differs from
kvpress on purpose, and matches kvpress's Gemma 3 rule. (kvpress's own pipeline cannot run that rule on text: it
builds the full layers' mask from the first layer's length, a sliding layer's, and fails on the question.)

Memory: transformers' ``generate`` cache bounds the sliding layers to the window; the plain ``DynamicCache`` the
pipeline and the evaluations use keeps every token there (the attention mask applies the window), so a cache's
mean length over layers (:func:`kvpress_ext.core.positions.cache_length`) counts them whole.

When a press moves positions (key re-rotation: R-KV, lazy streaming, KeyRerotationPress), the next token's RoPE
position changes for every layer, since the model computes one position per token. The sliding layers' keys are
then shifted by the same amount (:func:`kvpress_ext.core.apply.apply_press` does it through
:meth:`Gemma3Adapter.rerotate_keys` with each layer's base), which keeps every query-key distance in them exact.
"""

from __future__ import annotations

import torch
from torch import nn

from kvpress_ext.core.adapters.llama import LlamaFamilyAdapter


class LayerRotary:
    """One layer type's RoPE, shaped like a Llama rotary embedding (``inv_freq``, ``__call__(x, position_ids)``),
    for presses that compute RoPE tables themselves. A plain object, so setting it on a module registers nothing."""

    def __init__(self, rotary: nn.Module, layer_type: str):
        self._rotary = rotary
        self.layer_type = layer_type

    @property
    def inv_freq(self) -> torch.Tensor:
        return getattr(self._rotary, f"{self.layer_type}_inv_freq")

    @property
    def attention_scaling(self) -> float:
        return float(getattr(self._rotary, f"{self.layer_type}_attention_scaling", 1.0))

    def __call__(self, x: torch.Tensor, position_ids: torch.Tensor):
        return self._rotary(x, position_ids, self.layer_type)


class Gemma3Adapter(LlamaFamilyAdapter):
    """Gemma 3 text models: Llama layout with q/k norms, a RoPE base per layer type, sliding-window layers."""

    runs_model_presses = False  # KVzip/Finch hook every layer themselves: not our sliding-layer rule

    def __init__(self, name: str = "gemma3", model_types: tuple[str, ...] = ("gemma3_text",)):
        super().__init__(name, model_types, qk_norm=True)

    def _layer_type(self, model: nn.Module, layer: int | None) -> str:
        if layer is None:
            raise ValueError(
                "Gemma 3 rotates each layer type with its own RoPE base: pass layer= to the adapter's RoPE methods."
            )
        return model.config.layer_types[layer]

    def compressed_layers(self, model):
        return [i for i, t in enumerate(model.config.layer_types) if t != "sliding_attention"]

    def sliding_window(self, model, layer):
        return model.config.sliding_window if model.config.layer_types[layer] == "sliding_attention" else None

    def softmax_scale(self, model, layer):
        return float(model.config.query_pre_attn_scalar) ** -0.5

    def layer_rotary(self, model: nn.Module, layer: int) -> LayerRotary:
        return LayerRotary(self.rotary_embedding(model), self._layer_type(model, layer))

    def inv_freq(self, model, layer=None):
        return self.layer_rotary(model, layer).inv_freq

    def attention_scaling(self, model, layer=None):
        return self.layer_rotary(model, layer).attention_scaling

    def position_embeddings(self, model, layer, x, position_ids):
        return self.layer_rotary(model, layer)(x, position_ids)

    def press_view(self, model, module):
        """The module itself, with the rotary embedding of its own layer type (kvpress presses that build RoPE
        tables, e.g. ExpectedAttention's and R-KV's, then use the right base)."""
        rotary = module.__dict__.get("rotary_emb")
        if not isinstance(rotary, LayerRotary):
            # kvpress's BasePress.__call__ may have left the shared (all-types) embedding here: replace it
            module._modules.pop("rotary_emb", None)
            object.__setattr__(module, "rotary_emb", self.layer_rotary(model, module.layer_idx))
        return module
