"""The model-adapter interface: everything a press needs to know about a model, in one place.

Presses never test ``isinstance(model, ...)``; they ask the adapter for the decoder, its attention
modules, head counts, pre-RoPE queries/keys and how RoPE is applied. Adding an architecture means
writing one adapter (and registering it through the ``kvpress_ext_register_adapters`` hook).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvpress_ext.core import rope


@dataclass(frozen=True)
class AttentionShape:
    """Head counts and sizes of a model's attention (the same for every layer of the supported models)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int

    @property
    def num_groups(self) -> int:
        return self.num_heads // self.num_kv_heads


class ModelAdapter:
    """Base class: subclasses name the ``config.model_type`` values they handle and fill in the accessors.

    RoPE accessors take the layer index: a model may rotate each layer with its own base (Gemma 3). Adapters
    of single-base models ignore it.
    """

    #: Short family name shown by ``kvpress-ext list``.
    name: str = "base"
    #: ``config.model_type`` values this adapter drives.
    model_types: tuple[str, ...] = ()
    #: Whether kvpress presses that run the model themselves (KVzip, Finch) see this model as kvpress-ext does:
    #: they install their own hooks on every layer, so only where that is kvpress-ext's rule too.
    runs_model_presses: bool = False

    def matches(self, model: nn.Module) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) in self.model_types

    # --- structure -------------------------------------------------------------------------------
    def decoder(self, model: nn.Module) -> nn.Module:
        """The backbone without the LM head (``model.model`` for Llama)."""
        raise NotImplementedError

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(self.decoder(model).layers)

    def attention(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [self.attention(layer) for layer in self.layers(model)]

    def rotary_embedding(self, model: nn.Module) -> nn.Module:
        return self.decoder(model).rotary_emb

    def shape(self, model: nn.Module) -> AttentionShape:
        raise NotImplementedError

    def compressed_layers(self, model: nn.Module) -> list[int]:
        """Indices of the layers presses compress (every layer, unless a layer bounds its own cache)."""
        return list(range(len(self.layers(model))))

    def sliding_window(self, model: nn.Module, layer: int) -> int | None:
        """Tokens a query of ``layer`` may see (itself included), or None for full attention."""
        return None

    def softmax_scale(self, model: nn.Module, layer: int) -> float:
        """The factor on q.k before the softmax (1/sqrt(head_dim) unless the model says otherwise)."""
        return self.shape(model).head_dim ** -0.5

    # --- RoPE --------------------------------------------------------------------------------------
    def inv_freq(self, model: nn.Module, layer: int | None = None) -> torch.Tensor:
        """Inverse frequencies of the rotary dimensions of ``layer`` (length rotary_dim / 2)."""
        return self.rotary_embedding(model).inv_freq

    def attention_scaling(self, model: nn.Module, layer: int | None = None) -> float:
        return float(getattr(self.rotary_embedding(model), "attention_scaling", 1.0))

    def position_embeddings(self, model: nn.Module, layer: int, x: torch.Tensor, position_ids: torch.Tensor):
        """(cos, sin) as the model hands them to ``layer``'s attention, for positions (batch, seq)."""
        return self.rotary_embedding(model)(x, position_ids)

    def apply_rope(self, model: nn.Module, x: torch.Tensor, positions: torch.Tensor, layer: int | None = None):
        """RoPE of ``layer`` at ``positions`` on pre-RoPE ``x`` (..., seq, head_dim), partial rotary included."""
        inv_freq = self.inv_freq(model, layer).to(x.device)
        return rope.rotate(x, positions, inv_freq, self.attention_scaling(model, layer))

    def rerotate_keys(self, model: nn.Module, keys: torch.Tensor, from_pos: torch.Tensor, to_pos: torch.Tensor,
                      layer: int | None = None):
        """Move ``layer``'s cached keys from ``from_pos`` to ``to_pos`` (:func:`kvpress_ext.core.rope.rerotate`)."""
        return rope.rerotate(keys, from_pos, to_pos, self.inv_freq(model, layer).to(keys.device))

    # --- projections (pre-RoPE, shape (batch, heads, seq, head_dim)) ---------------------------------
    def prerope_queries(self, module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prerope_keys(self, module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def values(self, module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # --- what kvpress presses see ---------------------------------------------------------------------
    def hook_kwargs(self, module: nn.Module, args: tuple, kwargs: dict) -> dict:
        """The attention forward's arguments under kvpress's names (``hidden_states``, ``past_key_values``,
        ``cache_position``, ``position_embeddings``), in the basis of :meth:`press_view`."""
        out = dict(kwargs)
        if "hidden_states" not in out and args:
            out["hidden_states"] = args[0]
        return out

    def press_view(self, model: nn.Module, module: nn.Module):
        """The attention module as a kvpress press expects it (Llama-shaped). Default: the module itself."""
        if not hasattr(module, "rotary_emb"):
            module.rotary_emb = self.rotary_embedding(model)
        return module

    def describe(self) -> str:
        return f"{self.name}: model_type in {', '.join(self.model_types)}"
