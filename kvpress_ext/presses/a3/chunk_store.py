"""Precomputed per-chunk KV caches on disk, for A3 / CacheBlend fusion.

Each chunk is encoded on its own, right after a shared prefix (e.g. the BOS token or a system prompt):
the chunk's tokens see the prefix and themselves, nothing else. Only the chunk's own K/V are stored.

Key layout: keys are stored **post-RoPE at local positions** ``P + j`` (P = prefix length, j = index in
the chunk), exactly as the model's cache holds them. Fusion moves them to their global positions with
one more rotation (:func:`kvpress_ext.rope.rerotate`). Storing post-RoPE keys means a stored chunk is
also a valid cache of ``prefix + chunk`` on its own.

On disk::

    root/<model fingerprint>/prefix-<sha>/            the prefix's cache (encoded from nothing)
    root/<model fingerprint>/chunk-<sha(prefix ids, chunk ids)>/
        tensors.safetensors   layer{i}.keys, layer{i}.values, [surprisal]
        metadata.json         token ids, prefix length, fingerprint, layer count, dtype

The model fingerprint includes a hash of the embedding weights, so two random models with the same
config never share entries. The chunk key hashes the prefix ids too: the same chunk after another
prefix has other K/V. Entries are written atomically (:func:`kvpress_ext.cache_io.atomic_directory_write`)
and reused when present. A missing, corrupt or mismatched entry raises :class:`CacheFormatError`, or is
recomputed when ``recompute_bad=True``.

``save_surprisal=True`` also stores each token's surprisal ``-log p(token | prefix, earlier chunk
tokens)`` from the same forward pass (0 for the chunk's first token), for the ``surprisal_chunk``
strategy.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import DynamicCache

from kvpress_ext.adapters import get_adapter
from kvpress_ext.cache_io import atomic_directory_write, model_fingerprint
from kvpress_ext.devices import input_device, layer_devices
from kvpress_ext.errors import CacheFormatError

STORE_FORMAT = 1
TENSORS = "tensors.safetensors"
META = "metadata.json"


@dataclass
class ChunkKV:
    """One chunk's stored K/V: ``keys[i]``/``values[i]`` are (1, kv_heads, n, head_dim) for layer i."""

    token_ids: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    prefix_len: int
    surprisal: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.token_ids)


def _sha(*id_lists) -> str:
    h = hashlib.sha256()
    for ids in id_lists:
        h.update(json.dumps([int(t) for t in ids]).encode())
        h.update(b"|")
    return h.hexdigest()[:32]


class ChunkStore:
    """Directory of per-chunk caches for one model (see module docstring).

    Parameters
    ----------
    root: directory of the store (created on first write).
    model: the model the caches belong to (its fingerprint names the sub-directory).
    tokenizer: needed only to pass chunks as strings (encoded without special tokens).
    prefix_ids: shared prefix every chunk is encoded after; default ``[bos_token_id]`` when the model
        has one, else empty.
    save_surprisal: also compute and store per-token surprisal.
    recompute_bad: recompute (and overwrite) a corrupt or mismatched entry instead of raising.
    """

    def __init__(self, root, model, tokenizer=None, prefix_ids=None, save_surprisal: bool = False,
                 recompute_bad: bool = False):
        self.root = Path(root)
        self.model = model
        self.tokenizer = tokenizer
        if prefix_ids is None:
            bos = getattr(model.config, "bos_token_id", None)
            prefix_ids = [bos] if isinstance(bos, int) else []
        self.prefix_ids = [int(t) for t in prefix_ids]
        self.save_surprisal = save_surprisal
        self.recompute_bad = recompute_bad
        self.fingerprint = model_fingerprint(model, include_weights=True)
        self.hits = 0
        self.misses = 0

    # --- paths ------------------------------------------------------------------------------------------
    @property
    def directory(self) -> Path:
        return self.root / self.fingerprint

    def prefix_path(self, prefix_ids=None) -> Path:
        return self.directory / f"prefix-{_sha(self._prefix(prefix_ids))}"

    def chunk_path(self, chunk_ids, prefix_ids=None) -> Path:
        return self.directory / f"chunk-{_sha(self._prefix(prefix_ids), chunk_ids)}"

    def _prefix(self, prefix_ids):
        return self.prefix_ids if prefix_ids is None else [int(t) for t in prefix_ids]

    def encode(self, chunk) -> list[int]:
        """Token ids of a chunk given as ids or as text (text needs the tokenizer)."""
        if isinstance(chunk, str):
            if self.tokenizer is None:
                raise ValueError("ChunkStore got a text chunk but no tokenizer: pass tokenizer= or token ids.")
            return list(self.tokenizer(chunk, add_special_tokens=False)["input_ids"])
        return [int(t) for t in chunk]

    # --- public API ---------------------------------------------------------------------------------------
    def prefix(self, prefix_ids=None) -> ChunkKV:
        """The prefix's own cache (positions 0..P-1), computed and stored on first use."""
        prefix = self._prefix(prefix_ids)
        return self._get(self.prefix_path(prefix), prefix, [], need_surprisal=False)

    def get(self, chunk, prefix_ids=None, need_surprisal: bool = False) -> ChunkKV:
        """The cache of ``chunk`` encoded after the prefix; computed and stored if absent."""
        ids = self.encode(chunk)
        if not ids:
            raise ValueError("Cannot store an empty chunk.")
        prefix = self._prefix(prefix_ids)
        return self._get(self.chunk_path(ids, prefix), ids, prefix, need_surprisal)

    def precompute(self, chunks, prefix_ids=None) -> list[Path]:
        """Encode and store every chunk (skipping those already stored); returns their directories."""
        return [self.chunk_path(self.get(c, prefix_ids).token_ids, prefix_ids) for c in chunks]

    def contains(self, chunk, prefix_ids=None) -> bool:
        return (self.chunk_path(self.encode(chunk), prefix_ids) / META).is_file()

    # --- internals -------------------------------------------------------------------------------------------
    def _get(self, path: Path, ids, prefix, need_surprisal: bool) -> ChunkKV:
        if path.exists():
            try:
                entry = self._load(path, ids, prefix)
                if need_surprisal and entry.surprisal is None:
                    if not self.save_surprisal:
                        raise CacheFormatError(
                            f"Chunk entry {path} has no stored surprisal; build the store with save_surprisal=True."
                        )
                else:
                    self.hits += 1
                    return entry
            except CacheFormatError:
                if not self.recompute_bad:
                    raise
        self.misses += 1
        entry = self._compute(ids, prefix, surprisal=self.save_surprisal or need_surprisal)
        self._save(path, entry)
        return entry

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

    def _save(self, path: Path, entry: ChunkKV) -> None:
        tensors = {}
        for i, (k, v) in enumerate(zip(entry.keys, entry.values)):
            tensors[f"layer{i}.keys"], tensors[f"layer{i}.values"] = k, v
        if entry.surprisal is not None:
            tensors["surprisal"] = entry.surprisal.float().contiguous()
        meta = {
            "format": STORE_FORMAT,
            "model_fingerprint": self.fingerprint,
            "model_name": getattr(self.model.config, "_name_or_path", None),
            "token_ids": entry.token_ids,
            "prefix_len": entry.prefix_len,
            "num_layers": len(entry.keys),
            "key_layout": "post-rope at local positions prefix_len + j",
            "dtype": str(entry.keys[0].dtype),
        }

        def write(tmp: Path):
            save_file(tensors, str(tmp / TENSORS))
            (tmp / META).write_text(json.dumps(meta))

        atomic_directory_write(path, write)

    def _load(self, path: Path, ids, prefix) -> ChunkKV:
        try:
            meta = json.loads((path / META).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CacheFormatError(f"Chunk entry {path} has a missing or corrupt {META} ({exc}).") from exc
        expected_ids = list(ids) if ids else list(prefix)
        expected_prefix = len(prefix) if ids else 0
        problems = []
        if meta.get("format") != STORE_FORMAT:
            problems.append(f"format {meta.get('format')!r} != {STORE_FORMAT}")
        if meta.get("model_fingerprint") != self.fingerprint:
            problems.append(f"model fingerprint {meta.get('model_fingerprint')} != {self.fingerprint}")
        if meta.get("token_ids") != expected_ids:
            problems.append("stored token ids differ from the chunk's")
        if meta.get("prefix_len") != expected_prefix:
            problems.append(f"prefix length {meta.get('prefix_len')} != {expected_prefix}")
        n_layers = len(get_adapter(self.model).layers(self.model))
        if meta.get("num_layers") != n_layers:
            problems.append(f"{meta.get('num_layers')} layers stored, model has {n_layers}")
        if problems:
            raise CacheFormatError(f"Chunk entry {path} does not match: {'; '.join(problems)}. Recompute it "
                                   "(ChunkStore(..., recompute_bad=True)) or delete the directory.")
        try:
            tensors = load_file(str(path / TENSORS))
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise CacheFormatError(f"Chunk entry {path}: cannot read {TENSORS} ({exc}); it is corrupt.") from exc
        keys, values = [], []
        for i in range(n_layers):
            k, v = tensors.get(f"layer{i}.keys"), tensors.get(f"layer{i}.values")
            if k is None or v is None or k.shape[-2] != len(expected_ids) or v.shape[-2] != len(expected_ids):
                raise CacheFormatError(f"Chunk entry {path}: layer {i} tensors are missing or of the wrong length.")
            keys.append(k)
            values.append(v)
        surprisal = tensors.get("surprisal")
        if surprisal is not None and surprisal.numel() != len(expected_ids):
            raise CacheFormatError(f"Chunk entry {path}: surprisal has {surprisal.numel()} values, "
                                   f"chunk has {len(expected_ids)} tokens.")
        return ChunkKV(expected_ids, keys, values, expected_prefix, surprisal)
