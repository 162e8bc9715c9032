"""Where the next token goes: one mechanism for every press that moves positions.

Each cache carries a :class:`PositionState`. Every forward pass through the decoder inside
:func:`kvpress_ext.core.apply.apply_press` (the pipeline, ``model.generate``, the evaluation loops) takes
its RoPE positions from it, through :func:`track_positions`'s pre-hook, and advances it; a press that
evicts and re-rotates keys (StreamingLLM-style positions inside the cache, R-KV's key rotation,
kvpress's KeyRerotationPress) sets the next position with :func:`set_next_position`. No loop adds
``context_length + i`` on its own.

Two indices are kept apart:

* ``cache_position`` (physical): index of the new tokens in the cache tensors, i.e. the current cache
  length + 0..n-1. It drives the causal mask and kvpress's prefill test.
* ``position_ids`` (logical): RoPE positions, ``state.next_position + 0..n-1``.

Without compression the two coincide and nothing changes.

A model whose layers keep caches of different lengths (Gemma 3: presses compress its full-attention layers, not its
sliding-window ones) has one physical index per kind of layer: the pre-hook then builds each kind's attention mask
from its own cache length and hands the model the masks by layer type (transformers' hybrid-model interface).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

_ATTR = "_kvpress_ext_positions"


@dataclass
class PositionState:
    """Position bookkeeping of one cache.

    ``next_position``: RoPE position of the next token. ``seen_tokens``: tokens fed through the cache
    so far (compressed or not). ``rotated``: whether a press re-rotated cached keys (saved with caches).
    """

    next_position: int = 0
    seen_tokens: int = 0
    rotated: bool = False


def position_state(cache) -> PositionState:
    """The cache's state, created on first use (from its length, for a cache filled elsewhere)."""
    state = getattr(cache, _ATTR, None)
    if state is None:
        n = int(cache.get_seq_length()) if cache is not None else 0
        state = PositionState(next_position=n, seen_tokens=n)
        setattr(cache, _ATTR, state)
    return state


def next_position(cache) -> int:
    """RoPE position the next token fed to ``cache`` will get."""
    return position_state(cache).next_position


def set_next_position(cache, position: int, rotated: bool = True) -> None:
    """Called by a press that moved keys: the next token goes to ``position``."""
    state = position_state(cache)
    state.next_position = int(position)
    state.rotated = state.rotated or rotated


def _num_new_tokens(args, kwargs) -> tuple[int, int, torch.device]:
    x = kwargs.get("input_ids")
    if x is None and args:
        x = args[0]
    if x is None:
        x = kwargs.get("inputs_embeds")
    return x.shape[0], x.shape[1], x.device


def _pre_hook(module, args, kwargs):
    cache = kwargs.get("past_key_values")
    if cache is None:
        return args, kwargs
    state = position_state(cache)
    bsz, n, device = _num_new_tokens(args, kwargs)
    physical = int(cache.get_seq_length())
    kwargs["cache_position"] = torch.arange(physical, physical + n, device=device)
    positions = torch.arange(state.next_position, state.next_position + n, device=device)
    kwargs["position_ids"] = positions.unsqueeze(0).expand(bsz, -1)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        if bool(mask.all()):
            kwargs["attention_mask"] = mask = None  # its length counts evicted tokens; without padding it says nothing
        elif physical != state.seen_tokens:
            raise ValueError(
                "Padded batches cannot be used with a compressed cache: run one sequence at a time "
                "(batch size 1) or without padding."
            )
    if mask is None:
        masks = _masks_by_layer_type(module, cache, kwargs, bsz, n, device)
        if masks is not None:
            kwargs["attention_mask"] = masks
    state.next_position += n
    state.seen_tokens += n
    return args, kwargs


def _masks_by_layer_type(decoder, cache, kwargs, bsz: int, n: int, device):
    """Causal masks by layer type, each from its own layers' cache length, when those lengths differ; else None."""
    config = getattr(decoder, "config", None)
    layer_types = getattr(config, "layer_types", None)
    if not layer_types or len(set(layer_types)) < 2 or len(cache.layers) < len(layer_types):
        return None
    first = {t: layer_types.index(t) for t in dict.fromkeys(layer_types)}
    lengths = {t: int(cache.get_seq_length(i)) for t, i in first.items()}
    if len(set(lengths.values())) < 2:
        return None
    makers = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    if not set(lengths) <= set(makers):
        raise ValueError(f"Cannot build attention masks for layer types {sorted(lengths)} of a compressed cache.")
    embeds = torch.empty((bsz, n), dtype=next(decoder.parameters()).dtype, device=device)
    return {
        t: makers[t](config=config, inputs_embeds=embeds, attention_mask=None,
                     past_key_values=_OneLayerSizes(cache.layers[first[t]]),
                     cache_position=torch.arange(lengths[t], lengths[t] + n, device=device),
                     position_ids=kwargs["position_ids"])
        for t in lengths
    }


class _OneLayerSizes:
    """What transformers' mask builders read from a cache (``get_mask_sizes``), answered by one chosen layer."""

    def __init__(self, layer):
        self._layer = layer

    def get_mask_sizes(self, cache_position, layer_idx=None):
        return self._layer.get_mask_sizes(cache_position)


@contextmanager
def track_positions(decoder: torch.nn.Module):
    """Install the pre-hook that sets ``position_ids``/``cache_position`` from the cache's state."""
    handle = decoder.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def cache_length(cache) -> int:
    """Entries in the cache (mean over layers, rounded; presses may keep different counts per layer)."""
    n = len(getattr(cache, "layers", []))
    return round(sum(cache.get_seq_length(i) for i in range(n)) / n) if n else 0
