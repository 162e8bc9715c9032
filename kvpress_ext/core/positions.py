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
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

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
    if mask is not None and mask.dim() == 2:
        if bool(mask.all()):
            kwargs["attention_mask"] = None  # its length counts evicted tokens; without padding it says nothing
        elif physical != state.seen_tokens:
            raise ValueError(
                "Padded batches cannot be used with a compressed cache: run one sequence at a time "
                "(batch size 1) or without padding."
            )
    state.next_position += n
    state.seen_tokens += n
    return args, kwargs


def _count_hooks(caches: list):
    """Pre/post hooks that advance a cache's state by the tokens of each outermost forward, positions untouched."""
    depth = [0]

    def pre_hook(module, args, kwargs):
        depth[0] += 1
        cache = kwargs.get("past_key_values")
        if depth[0] == 1 and cache is not None:
            state = position_state(cache)
            n = _num_new_tokens(args, kwargs)[1]
            state.next_position += n
            state.seen_tokens += n
            if all(c is not cache for c in caches):
                caches.append(cache)

    def post_hook(module, args, kwargs, output):
        depth[0] -= 1

    return pre_hook, post_hook


@contextmanager
def count_positions(decoder: torch.nn.Module, caches: list | None = None):
    """Advance each cache's state by the tokens fed through ``decoder``, leaving the pass's positions to the model
    (which takes them from the cache length): for a press that runs the model and owns the positions of its
    passes. The caches seen are appended to ``caches``."""
    pre_hook, post_hook = _count_hooks(caches if caches is not None else [])
    handles = [decoder.register_forward_pre_hook(pre_hook, with_kwargs=True),
               decoder.register_forward_hook(post_hook, with_kwargs=True, always_call=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


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
