"""Evict from a fused A3 cache with any registered (hook-based) press, e.g. StreamingLLM or SnapKV.

The press's ``forward_hook`` is called once per layer as if that layer had just prefilled the whole
fused sequence: ``hidden_states`` are the normed attention inputs recorded during fusion (recomputed
rows; rows that were not recomputed are zero, which only matters for presses that score from hidden
states of document tokens: SnapKV-like presses use the last rows, the always-recomputed question),
``position_embeddings`` are RoPE tables for positions 0..T-1, and ``cache_position`` is 0..T-1. Kept keys
are not re-rotated, so the next token keeps position T. A press that manages the whole cache
(``after_forward``, e.g. ``lazy_streaming``) is called once on the fused cache instead. A press that refuses the
fused cache (kvpress asserts, e.g. ``n_sink`` or ``window_size`` not below its length) is a
:class:`~kvpress_ext.core.errors.PressInputError` naming the press and the length: the user asked for eviction,
so an uncompressed answer would not be what was asked for.
"""

from __future__ import annotations

import torch
from kvpress import BasePress

from kvpress_ext.core.adapters import get_adapter
from kvpress_ext.core.apply import manages_whole_cache, shift_untouched_layers
from kvpress_ext.core.contract import drives_model, reset_press
from kvpress_ext.core.devices import execution_device
from kvpress_ext.core.errors import PressInputError, PressParameterError
from kvpress_ext.core.positions import position_state
from kvpress_ext.core.registry import get_press


def evict_cache(model, result, name: str, kwargs: dict | None = None):
    """Compress ``result.cache`` in place with the press registered as ``name`` (on the layers the model lets
    presses compress: not Gemma 3's sliding-window ones)."""
    press = get_press(name, **(kwargs or {}))
    if press is None:
        return result.cache
    adapter = get_adapter(model)
    if manages_whole_cache(press):  # e.g. lazy_streaming: works on the cache alone
        state = position_state(result.cache)
        before = state.next_position
        press.post_init_from_model(model)
        press.after_forward(result.cache)
        reset_press(press)
        shift_untouched_layers(adapter, model, result.cache, state.next_position - before)
        return result.cache
    if drives_model(press) or not isinstance(press, BasePress):
        raise PressParameterError(f"a3: evict={name!r} must be a hook-based press (e.g. streaming_llm, snapkv, knorm).")
    cache = result.cache
    total = int(position_state(cache).seen_tokens)
    pos = torch.arange(total, device=cache.layers[0].keys.device)
    press.post_init_from_model(model)
    rotary_device = execution_device(adapter.rotary_embedding(model))
    modules = adapter.attention_modules(model)
    for i in adapter.compressed_layers(model):
        module, hidden = modules[i], result.layer_inputs[i]
        # layers may sit on different devices (device_map): RoPE tables and positions go where the layer is
        tables = adapter.position_embeddings(model, i, hidden.to(rotary_device), pos.unsqueeze(0).to(rotary_device))
        cos_sin = tuple(t.to(hidden.device) for t in tables)
        layer_pos = pos.to(hidden.device)
        raw = {"hidden_states": hidden, "past_key_values": cache, "layer_past": cache, "cache_position": layer_pos,
               "position_embeddings": cos_sin}
        view = adapter.press_view(model, module)
        try:
            press.forward_hook(view, [hidden], adapter.hook_kwargs(module, (), raw), (None, None))
        except AssertionError as exc:  # kvpress asserts on its input, e.g. n_sink beyond the fused length
            if isinstance(exc, PressInputError):
                raise
            raise PressInputError(
                f"a3: evict press {name!r} cannot compress the {total}-token fused cache "
                f"({str(exc).strip() or 'assertion failed'}); pass parameters that fit it (see `kvpress-ext "
                f"describe {name}`)."
            ) from None
    reset_press(press)
    return cache
