"""Llama-family adapter: Llama, Mistral, Qwen2 and Qwen3 (Qwen3 adds RMS norms on queries and keys).

These models share the layout kvpress was written for (``model.model.layers[i].self_attn`` with
``q_proj``/``k_proj``/``v_proj``/``o_proj`` and full-head rotate-half RoPE), so kvpress presses see the
attention module itself.
"""

from __future__ import annotations

import torch
from torch import nn

from kvpress_ext.core.adapters.base import AttentionShape, ModelAdapter


class LlamaFamilyAdapter(ModelAdapter):
    """Separate q/k/v projections, grouped-query attention, full rotary; optional q/k norm (Qwen3)."""

    runs_model_presses = True  # kvpress's own hooks on every layer: the same rule as ours

    def __init__(self, name: str, model_types: tuple[str, ...], qk_norm: bool = False):
        self.name = name
        self.model_types = model_types
        self.qk_norm = qk_norm

    def decoder(self, model: nn.Module) -> nn.Module:
        return model if hasattr(model, "layers") else model.model

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def shape(self, model: nn.Module) -> AttentionShape:
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        return AttentionShape(cfg.num_attention_heads, kv, head_dim, 2 * self.inv_freq(model, 0).shape[-1])

    def _split(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.shape
        return x.view(bsz, seq, -1, module.head_dim).transpose(1, 2)

    def prerope_queries(self, module, hidden_states):
        q = self._split(module, module.q_proj(hidden_states))
        return module.q_norm(q) if self.qk_norm else q

    def prerope_keys(self, module, hidden_states):
        k = self._split(module, module.k_proj(hidden_states))
        return module.k_norm(k) if self.qk_norm else k

    def values(self, module, hidden_states):
        return self._split(module, module.v_proj(hidden_states))
