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

A left-padded batch (a 2-D ``attention_mask`` with zeros) switches the cache to per-sequence bookkeeping,
:class:`PaddedBatch`: each sequence has its own :class:`PositionState` (its first real token at position 0), and
a mask of which cache slots hold its tokens. Between forward passes every layer has the same slots and each
sequence's tokens are the last ones of its row (pads and the places of evicted tokens come first), so one 2-D
mask describes the whole cache; the pre-hook hands the model that mask followed by the new tokens' own.

A model whose layers keep caches of different lengths (Gemma 3: presses compress its full-attention layers, not its
sliding-window ones) has one physical index per kind of layer: the pre-hook then builds each kind's attention mask
from its own cache length and hands the model the masks by layer type (transformers' hybrid-model interface).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from kvpress_ext.core.errors import KVPressExtError

_ATTR = "_kvpress_ext_positions"
_BATCH_ATTR = "_kvpress_ext_batch"


class BatchInputError(KVPressExtError):
    """A padded batch that cannot be run: padding on the right, or a press that cannot compress it per sequence."""


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


def use_position_state(obj, state: PositionState) -> None:
    """Give ``obj`` (a cache, or one sequence's view of a batch's cache) the position state ``state``."""
    setattr(obj, _ATTR, state)


def next_position(cache) -> int:
    """RoPE position the next token fed to ``cache`` will get."""
    return position_state(cache).next_position


def set_next_position(cache, position: int, rotated: bool = True) -> None:
    """Called by a press that moved keys: the next token goes to ``position``."""
    state = position_state(cache)
    state.next_position = int(position)
    state.rotated = state.rotated or rotated


@dataclass
class PaddedBatch:
    """Per-sequence state of a left-padded batch kept on its cache.

    ``rows[i]``: positions of sequence ``i``. ``mask`` (B, L): which cache slots hold a token of each sequence, the
    same in every layer between forwards. During a forward, ``pending`` (B, L + n) is the mask of the slots of a
    layer before any press touched it, and ``compressed[layer]`` the mask of a layer a press rebuilt.
    """

    rows: list
    mask: torch.Tensor
    pending: torch.Tensor | None = None
    compressed: dict = field(default_factory=dict)

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens each sequence holds in the cache."""
        return self.mask.sum(dim=1)


def padded_batch(cache) -> PaddedBatch | None:
    """The cache's per-sequence state if a padded batch went through it, else None."""
    return getattr(cache, _BATCH_ATTR, None) if cache is not None else None


def _refuse_mixed_layer_caches(decoder) -> None:
    """Padded batches keep one slot mask for every layer; layers that keep caches of their own length (sliding-window
    layers beside full-attention ones, Gemma 3) would need one per kind: refused rather than answered wrongly."""
    layer_types = getattr(getattr(decoder, "config", None), "layer_types", None) or []
    if len(set(layer_types)) > 1:
        kinds = ", ".join(sorted(set(layer_types)))
        raise BatchInputError(f"Padded batches are not supported on a model whose layers keep caches of different "
                              f"lengths ({kinds}): run one sequence at a time (batch_size=1).")


def _start_batch(cache, bsz: int, device) -> PaddedBatch:
    """Per-sequence state from the cache's single state (the cache holds equal, unpadded sequences so far)."""
    state = position_state(cache)
    physical = int(cache.get_seq_length())
    rows = [PositionState(state.next_position, state.seen_tokens, state.rotated) for _ in range(bsz)]
    batch = PaddedBatch(rows=rows, mask=torch.ones(bsz, physical, dtype=torch.bool, device=device))
    setattr(cache, _BATCH_ATTR, batch)
    return batch


def _batched_inputs(cache, batch: PaddedBatch, kwargs, n: int, device) -> None:
    """Attention mask, physical and RoPE positions of a forward into a padded batch's cache (per sequence)."""
    mask = kwargs.get("attention_mask")
    bsz = len(batch.rows)
    if mask is not None and mask.dim() == 2:
        new = mask[:, -n:].to(device=device, dtype=torch.bool)
    else:
        new = torch.ones(bsz, n, dtype=torch.bool, device=device)
    if bool((new[:, 1:] < new[:, :-1]).any()):
        raise BatchInputError("Padding must be on the left of each sequence: set tokenizer.padding_side = 'left'.")
    physical = int(cache.get_seq_length())
    if batch.mask.shape[1] != physical:
        raise BatchInputError(f"The cache of this padded batch holds {physical} slots but {batch.mask.shape[1]} "
                              "were recorded: it was changed outside kvpress-ext; start a new cache.")
    batch.mask = batch.mask.to(device)
    counts = new.sum(dim=1).tolist()
    starts = torch.tensor([row.next_position for row in batch.rows], device=device)
    positions = starts.unsqueeze(1) + new.long().cumsum(dim=1) - 1
    for row, count in zip(batch.rows, counts):
        row.next_position += count
        row.seen_tokens += count
    batch.pending = torch.cat([batch.mask, new], dim=1)
    batch.compressed = {}
    kwargs["attention_mask"] = batch.pending.long()
    kwargs["cache_position"] = torch.arange(physical, physical + n, device=device)
    kwargs["position_ids"] = torch.where(new, positions, starts.unsqueeze(1).expand(-1, n))


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
    mask = kwargs.get("attention_mask")
    batch = padded_batch(cache)
    if batch is None and mask is not None and mask.dim() == 2 and not bool(mask.all()):
        if not bool(mask[:, :-n].all()):
            raise BatchInputError("The attention mask marks pads among tokens this cache holds as a batch without "
                                  "padding: pass the padded mask from the first forward into the cache on.")
        _refuse_mixed_layer_caches(module)
        batch = _start_batch(cache, bsz, device)
    if batch is not None:
        _batched_inputs(cache, batch, kwargs, n, device)
        state.seen_tokens += n
        return args, kwargs
    physical = int(cache.get_seq_length())
    kwargs["cache_position"] = torch.arange(physical, physical + n, device=device)
    positions = torch.arange(state.next_position, state.next_position + n, device=device)
    kwargs["position_ids"] = positions.unsqueeze(0).expand(bsz, -1)
    if mask is not None and mask.dim() == 2:
        kwargs["attention_mask"] = mask = None  # its length counts evicted tokens; without padding it says nothing
    if mask is None:
        masks = _masks_by_layer_type(module, cache, kwargs, bsz, n, device)
        if masks is not None:
            kwargs["attention_mask"] = masks
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


def left_aligned(mask: torch.Tensor, width: int) -> torch.Tensor:
    """(B, ``width``) mask whose row i ends with ``mask[i].sum()`` ones (a padded batch's slots after settling)."""
    counts = mask.sum(dim=1, keepdim=True)
    return torch.arange(width, device=mask.device) >= width - counts


def gather_slots(layer, mask: torch.Tensor, width: int) -> None:
    """Move each row's marked slots of ``layer`` to the end of a ``width``-slot row, in their order."""
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, -width:]  # unmarked first, order kept
    for name in ("keys", "values"):
        x = getattr(layer, name)
        idx = order[:, None, :, None].expand(x.shape[0], x.shape[1], width, x.shape[-1])
        setattr(layer, name, x.gather(2, idx))


def settle(cache, batch: PaddedBatch) -> None:
    """After a forward into a padded batch: every layer to the same slots, each row's tokens at its end."""
    layers = cache.layers
    masks = [batch.compressed.get(i, batch.pending) for i in range(len(layers))]
    counts = masks[0].sum(dim=1)
    if any(not torch.equal(m.sum(dim=1), counts) for m in masks[1:]):
        raise BatchInputError("The press kept a different number of tokens in different layers, which one attention "
                              "mask cannot describe: run this press one sequence at a time (batch_size=1).")
    width = int(counts.max()) if counts.numel() else 0
    target = left_aligned(masks[0], width)
    for layer, mask in zip(layers, masks):
        extra = mask.shape[1] - width
        if torch.equal(mask[:, extra:], target):  # already settled: drop leading slots no row uses
            if extra:
                layer.keys, layer.values = layer.keys[:, :, extra:], layer.values[:, :, extra:]
        else:
            gather_slots(layer, mask, width)
    batch.mask, batch.pending, batch.compressed = target, None, {}


def _post_hook(module, args, kwargs, output):
    cache = kwargs.get("past_key_values")
    if cache is None:
        cache = getattr(output, "past_key_values", None)
    batch = padded_batch(cache)
    if batch is not None and batch.pending is not None:
        settle(cache, batch)
    return output


@contextmanager
def track_positions(decoder: torch.nn.Module):
    """Install the hooks that set ``position_ids``/``cache_position`` (and a padded batch's attention mask) from
    the cache's state, and settle a padded batch's cache after each forward."""
    handles = [decoder.register_forward_pre_hook(_pre_hook, with_kwargs=True),
               decoder.register_forward_hook(_post_hook, with_kwargs=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def cache_length(cache) -> int:
    """Entries in the cache (mean over layers, rounded; presses may keep different counts per layer)."""
    n = len(getattr(cache, "layers", []))
    return round(sum(cache.get_seq_length(i) for i in range(n)) / n) if n else 0
