"""Presses on a left-padded batch: each sequence compressed as if it were alone.

A press written for one sequence (every kvpress press, R-KV, lazy streaming) must not see pads: a scorer would
rank them with the real tokens, a ratio would apply to the padded length, a window would cover pads. So in a
padded batch (:class:`~kvpress_ext.core.positions.PaddedBatch`) a press runs once per sequence on a
:class:`RowCache`: a batch-1 cache holding only that sequence's tokens, with the sequence's own
:class:`~kvpress_ext.core.positions.PositionState` (so a press that moves positions moves that sequence's), and the
forward's inputs cut to the sequence's new tokens. The rows it returns, of any lengths, go back into the layer
right-aligned (free slots first, masked out); :func:`kvpress_ext.core.positions.settle` then aligns the layers.

A row cache lives as long as the batch, so state a press keeps on its cache (R-KV's slot bookkeeping) is kept per
sequence. Whether a press may run this way is its contract's ``batches`` field; others are refused.
"""

from __future__ import annotations

import torch

from kvpress_ext.core.positions import BatchInputError, PaddedBatch, padded_batch, use_position_state

_ROWS_ATTR = "_kvpress_ext_rows"


class RowLayer:
    """One layer of one sequence: ``keys``/``values`` (1, heads, tokens, dim)."""

    __slots__ = ("keys", "values")

    def __init__(self):
        self.keys = self.values = None


class RowCache:
    """One sequence of a padded batch, shown to a press as a batch-1 cache of its own tokens only."""

    def __init__(self, state, n_layers: int):
        self.layers = [RowLayer() for _ in range(n_layers)]
        use_position_state(self, state)

    def layer(self, layer_idx: int) -> RowLayer:
        """Layer ``layer_idx``, made when first needed (a cache grows its layers in the first forward)."""
        while len(self.layers) <= layer_idx:
            self.layers.append(RowLayer())
        return self.layers[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        keys = self.layers[layer_idx].keys
        return 0 if keys is None else keys.shape[-2]

    def __len__(self) -> int:
        return len(self.layers)


def row_caches(cache, batch: PaddedBatch) -> list[RowCache]:
    """The batch's row caches, made on first use and kept on the cache (``cache`` may be an adapter's view)."""
    real = getattr(cache, "_cache", cache)
    rows = getattr(real, _ROWS_ATTR, None)
    if rows is None or len(rows) != len(batch.rows):
        rows = [RowCache(state, len(cache.layers)) for state in batch.rows]
        setattr(real, _ROWS_ATTR, rows)
    return rows


def _slots(mask_row: torch.Tensor):
    """Index of a row's marked slots: a slice when they are contiguous (no copy), else an index tensor."""
    idx = mask_row.nonzero().squeeze(1)
    if idx.numel() == 0:
        return slice(0, 0)
    first, last = int(idx[0]), int(idx[-1])
    return slice(first, last + 1) if last - first + 1 == idx.numel() else idx


def _put_back(layer, keys: list, values: list, device) -> torch.Tensor:
    """Rows of any lengths into ``layer``, right-aligned; returns the layer's mask (B, width)."""
    lengths = torch.tensor([k.shape[-2] for k in keys], device=device)
    width = int(lengths.max())
    ref = keys[0]
    new_k = ref.new_zeros(len(keys), ref.shape[1], width, ref.shape[-1])
    new_v = values[0].new_zeros(len(keys), values[0].shape[1], width, values[0].shape[-1])
    for i, (k, v) in enumerate(zip(keys, values)):
        n = k.shape[-2]
        if n:
            new_k[i, :, width - n :], new_v[i, :, width - n :] = k[0], v[0]
    layer.keys, layer.values = new_k, new_v
    return torch.arange(width, device=device) >= width - lengths.unsqueeze(1)


def _cut(x, i: int, new: slice):
    return None if x is None else x[i : i + 1, new]


def per_row_forward_hook(forward_hook, module, args, kwargs: dict, output):
    """A press's ``forward_hook`` on each sequence of a padded batch (see the module docstring)."""
    cache = kwargs["past_key_values"]
    batch = padded_batch(getattr(cache, "_cache", cache))
    layer_idx = module.layer_idx
    layer = cache.layers[layer_idx]
    keys, values = layer.keys, layer.values
    mask = batch.pending
    hidden = kwargs["hidden_states"]
    n = hidden.shape[1]
    counts = mask[:, -n:].sum(dim=1).tolist()
    attentions = output[1] if isinstance(output, tuple) and len(output) > 1 else None
    out_keys, out_values, changed = [], [], False
    for i, row in enumerate(row_caches(cache, batch)):
        slots = _slots(mask[i])
        k, v = keys[i : i + 1, :, slots], values[i : i + 1, :, slots]
        out_keys.append(k)
        out_values.append(v)
        if counts[i] == 0:  # nothing of this sequence in this forward (all pads)
            continue
        row_layer = row.layer(layer_idx)
        row_layer.keys, row_layer.values = k, v
        new = slice(n - counts[i], n)
        row_kwargs = dict(kwargs, hidden_states=hidden[i : i + 1, new], past_key_values=row, attention_mask=None,
                          cache_position=torch.arange(k.shape[-2] - counts[i], k.shape[-2], device=k.device))
        if kwargs.get("position_embeddings") is not None:
            row_kwargs["position_embeddings"] = tuple(_cut(x, i, new) for x in kwargs["position_embeddings"])
        if kwargs.get("position_ids") is not None:
            row_kwargs["position_ids"] = _cut(kwargs["position_ids"], i, new)
        row_output = output
        if isinstance(output, tuple):
            attn = None if attentions is None else attentions[i : i + 1, :, new][..., slots]
            row_output = (output[0][i : i + 1, new], attn, *output[2:])
        forward_hook(module, args, row_kwargs, row_output)
        if row_layer.keys is not k or row_layer.values is not v:
            out_keys[i], out_values[i], changed = row_layer.keys, row_layer.values, True
        row_layer.keys = row_layer.values = None  # the batch's cache holds the tensors, not the row
    if changed:
        batch.compressed[layer_idx] = _put_back(layer, out_keys, out_values, keys.device)
    return output


def per_row_after_forward(press, cache) -> None:
    """``press.after_forward`` on each sequence of a settled padded batch (whole-cache presses, e.g. lazy
    streaming); rebuilds every layer when a sequence was compacted."""
    batch = padded_batch(cache)
    lengths = batch.lengths.tolist()
    width = batch.mask.shape[1]
    rows = row_caches(cache, batch)
    originals = []
    for i, row in enumerate(rows):
        cut = slice(width - lengths[i], width)
        for j, layer in enumerate(cache.layers):
            row_layer = row.layer(j)
            row_layer.keys, row_layer.values = layer.keys[i : i + 1, :, cut], layer.values[i : i + 1, :, cut]
        originals.append([layer.keys for layer in row.layers])
        if lengths[i]:
            press.after_forward(row)
    if all(all(rl.keys is k for rl, k in zip(row.layers, ks)) for row, ks in zip(rows, originals)):
        return
    masks = [_put_back(layer, [row.layers[j].keys for row in rows], [row.layers[j].values for row in rows],
                       batch.mask.device) for j, layer in enumerate(cache.layers)]
    if any(not torch.equal(m, masks[0]) for m in masks[1:]):
        raise BatchInputError("The press kept a different number of tokens in different layers, which one attention "
                              "mask cannot describe: run this press one sequence at a time (batch_size=1).")
    batch.mask = masks[0]
    for row in rows:
        for row_layer in row.layers:
            row_layer.keys = row_layer.values = None


def row_lengths_follow_cache(cache) -> None:
    """Per sequence, the next position is the number of tokens it holds (presses that re-rotate kept keys)."""
    batch = padded_batch(cache)
    for state, n in zip(batch.rows, batch.lengths.tolist()):
        state.next_position = n
        state.rotated = True


__all__ = ["RowCache", "per_row_after_forward", "per_row_forward_hook", "row_caches", "row_lengths_follow_cache"]
