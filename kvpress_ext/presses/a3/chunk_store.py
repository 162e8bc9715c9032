"""The A3 chunk store: :class:`~kvpress_ext.storage.chunk_store.ChunkFileStore` (files, checks, resident tiers)
plus encoding a missing chunk with the model, each chunk on its own right after the shared prefix."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from kvpress_ext.core.adapters import get_adapter
from kvpress_ext.core.devices import input_device, layer_devices
from kvpress_ext.storage.chunk_store import ChunkFileStore, ChunkKV

__all__ = ["ChunkKV", "ChunkStore"]


class ChunkStore(ChunkFileStore):
    """Per-chunk caches for one model (parameters as :class:`ChunkFileStore`); a chunk not yet stored is encoded with
    the model (after the prefix's cache) and stored."""

    @torch.no_grad()
    def _compute(self, ids, prefix, surprisal: bool) -> ChunkKV:
        model = self.model
        device = input_device(model)
        cache = DynamicCache()
        if prefix and ids:
            pre = self.prefix(prefix)
            for i, (k, v, dev) in enumerate(zip(pre.keys, pre.values, layer_devices(model))):
                cache.update(k.to(dev), v.to(dev), i)
        if ids:
            x = torch.tensor([ids], device=device)
        else:  # the prefix itself
            x = torch.tensor([prefix], device=device)
        if surprisal:
            out = model(input_ids=x, past_key_values=cache)
            logp = out.logits[0, :-1].float().log_softmax(-1)
            nll = -logp.gather(-1, x[0, 1:, None]).squeeze(-1)
            surp = torch.cat([torch.zeros(1, device=device), nll]).cpu()
        else:
            get_adapter(model).decoder(model)(input_ids=x, past_key_values=cache)
            surp = None
        start = len(prefix) if ids else 0
        keys = [layer.keys[:, :, start:].contiguous().cpu() for layer in cache.layers]
        values = [layer.values[:, :, start:].contiguous().cpu() for layer in cache.layers]
        return ChunkKV(list(ids) if ids else list(prefix), keys, values, len(prefix) if ids else 0, surp)
