"""Precomputed per-chunk KV caches on disk and in memory, for A3 / CacheBlend fusion: the files, their checks and
the resident tier. Encoding a chunk with the model is the method's part (:mod:`kvpress_ext.presses.a3.chunk_store`).

Each chunk is encoded on its own, right after a shared prefix (e.g. the BOS token or a system prompt):
the chunk's tokens see the prefix and themselves, nothing else. Only the chunk's own K/V are stored.

Key layout: keys are stored **post-RoPE at local positions** ``P + j`` (P = prefix length, j = index in
the chunk), exactly as the model's cache holds them. Fusion moves them to their global positions with
one more rotation (:func:`kvpress_ext.core.rope.rerotate`). Storing post-RoPE keys means a stored chunk is
also a valid cache of ``prefix + chunk`` on its own.

On disk::

    root/<model fingerprint>/prefix-<sha>/            the prefix's cache (encoded from nothing)
    root/<model fingerprint>/chunk-<sha(prefix ids, chunk ids)>/
        tensors.safetensors   layer{i}.keys, layer{i}.values, [surprisal]
        metadata.json         token ids, prefix length, fingerprint, layer count, dtype

    root/store.json                                   marks the directory as a chunk store (kvpress-ext writes
                                                      only into a missing, empty or marked directory)

The model fingerprint (:func:`kvpress_ext.storage.cache_files.model_fingerprint`, shared with saved caches) hashes the
config and a sample of every weight, so two models with the same config never share entries. The chunk key
hashes the prefix ids too: the same chunk after another prefix has other K/V. Each entry is read and written
under its own file lock (:func:`kvpress_ext.storage.safe_write.path_lock`): concurrent writers of one store never compute
a chunk twice (the second waits, then reuses it), and a replacement is swapped in atomically and recoverably.
An entry's metadata lists the checksum of its tensor file; loading validates the metadata (exact keys, known
format), the checksum and that every value is finite. A missing, damaged or mismatched entry raises
:class:`CacheFormatError`, or is recomputed when ``recompute_bad=True``.

``memory_bytes=N`` keeps up to N bytes of entries resident (least recently used out first), on the model's
device; ``host_bytes=M`` adds a host-memory tier below it (pinned when CUDA is present) that receives what the
first tier evicts. An entry is then read and verified from disk once per process while it stays resident; one
evicted from every tier is read and verified again on its next use.

``save_surprisal=True`` also stores each token's surprisal ``-log p(token | prefix, earlier chunk
tokens)`` from the same forward pass (0 for the chunk's first token), for the ``surprisal_chunk``
strategy.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
from collections import OrderedDict
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from kvpress_ext.core.adapters import get_adapter
from kvpress_ext.core.devices import input_device
from kvpress_ext.core.errors import CacheFormatError
from kvpress_ext.storage.cache_files import (
    check_fields,
    check_finite,
    check_kv_tensors,
    check_version,
    file_checksum,
    is_checksum,
    is_int,
    model_fingerprint,
    read_json_object,
    read_verified_tensors,
)
from kvpress_ext.storage.inputs import load_json
from kvpress_ext.storage.safe_write import (
    atomic_write_bytes,
    check_target_dir,
    path_lock,
    recover,
    replace_directory,
    sweep,
)

STORE_FORMAT = 2
KNOWN_FORMATS = (2,)
STORE_KIND = "kvpress_ext.a3_chunk_store"
ENTRY_KIND = "kvpress_ext.a3_chunk"
STORE_MARKER = "store.json"
SUMMARY = "precompute_summary.json"
TENSORS = "tensors.safetensors"
META = "metadata.json"
FIX = "recompute it (recompute_bad=True) or delete the directory"


class ReadOnlyStoreError(CacheFormatError):
    """A damaged or missing entry in a store this process cannot write (``reason``, ``root``, ``why``): recomputing
    it in place is impossible, so the fix names a store one may write."""

    def __init__(self, reason: str, root: Path, why: str):
        self.reason, self.root, self.why = reason, root, why
        super().__init__(f"{reason}; the store {root} cannot be written here ({why}), so it cannot be repaired in "
                         "place: recompute into a copy you may write (recompute_bad=True), or ask its owner to.")
_HEX16 = re.compile(r"[0-9a-f]{16}")


def _is_store_entry(p: Path) -> bool:
    name = p.name
    return ((p.is_dir() and bool(_HEX16.fullmatch(name))) or name in (STORE_MARKER, SUMMARY)
            or (name.startswith(".") and (name.endswith(".lock") or ".tmp-" in name)))


def is_store_root(root) -> bool:
    """True for a chunk store (marked by ``store.json``, or laid out as one: fingerprint directories and our files)."""
    root = Path(root)
    if root.is_symlink() or not root.is_dir():
        return False
    try:
        marker = load_json((root / STORE_MARKER).read_bytes())
        if isinstance(marker, dict) and marker.get("kind") == STORE_KIND:
            return True
    except (OSError, ValueError):
        pass
    entries = list(root.iterdir())
    return bool(entries) and all(_is_store_entry(p) for p in entries)


def check_store_root(root, flag: str = "--store") -> Path:
    """Raise :class:`OutputPathError` unless ``root`` may hold a chunk store: missing, empty, or a store."""
    return check_target_dir(
        root, flag=flag, ours=is_store_root, what="a kvpress-ext chunk store",
        symlink_fix="pass a directory for the chunk store",
        file_error="is a file, not a kvpress-ext chunk store (a directory); pass a new directory or an existing store",
        foreign_error=f"is a directory that is not a kvpress-ext chunk store (no {STORE_MARKER}); pass a new or empty "
                      "directory (nothing was written)",
    )


_ENTRY_SCHEMA = {
    "kind": lambda v: v == ENTRY_KIND,
    "format": is_int,
    "model_fingerprint": lambda v: isinstance(v, str),
    "model_name": lambda v: v is None or isinstance(v, str),
    "token_ids": lambda v: isinstance(v, list) and bool(v) and all(is_int(t) for t in v),
    "prefix_len": is_int,
    "num_layers": lambda v: is_int(v, 1),
    "key_layout": lambda v: v == "post-rope at local positions prefix_len + j",
    "dtype": lambda v: isinstance(v, str),
    "checksums": lambda v: isinstance(v, dict) and set(v) == {TENSORS} and is_checksum(v[TENSORS]),
}


@dataclass
class ChunkKV:
    """One chunk's stored K/V: ``keys[i]``/``values[i]`` are (1, kv_heads, n, head_dim) for layer i."""

    token_ids: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    prefix_len: int
    surprisal: torch.Tensor | None = None
    _stack: tuple | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.token_ids)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every layer as two (layers, kv_heads, n, head_dim) tensors, so fusion moves a chunk
        with one operation instead of one per layer. Built once; the per-layer lists become views of them."""
        if self._stack is None:
            keys, values = torch.stack([k[0] for k in self.keys]), torch.stack([v[0] for v in self.values])
            self._stack = (keys, values)
            self.keys, self.values = [k[None] for k in keys], [v[None] for v in values]
        return self._stack

    @property
    def nbytes(self) -> int:
        keys, values = self.stacked()
        extra = self.surprisal.nbytes if self.surprisal is not None else 0
        return keys.nbytes + values.nbytes + extra

    def to(self, device, pin: bool = False) -> ChunkKV:
        """A copy of the tensors on ``device`` (in pinned host memory with ``pin``), stacked as :meth:`stacked`."""
        keys, values = self.stacked()
        if pin:
            keys, values = keys.cpu().pin_memory(), values.cpu().pin_memory()
        else:
            keys, values = keys.to(device), values.to(device)
        entry = ChunkKV(self.token_ids, [], [], self.prefix_len, self.surprisal, (keys, values))
        entry.keys, entry.values = [k[None] for k in keys], [v[None] for v in values]
        return entry


class ResidentTier:
    """Entries kept in memory within a byte budget, least recently used evicted first (one tier of the store)."""

    def __init__(self, budget_bytes: int, device="cpu", pin: bool = False):
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
            raise ValueError(f"a memory budget must be a number of bytes >= 0, got {budget_bytes!r}")
        self.budget, self.device, self.pin = budget_bytes, torch.device(device), pin
        self.entries: OrderedDict = OrderedDict()  # key -> ChunkKV, oldest use first
        self.used = 0

    def get(self, key):
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def pop(self, key):
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.used -= entry.nbytes
        return entry

    def put(self, key, entry: ChunkKV) -> list:
        """Keep ``entry`` (moved to this tier's memory); returns the (key, entry) pairs evicted to make room, or
        the entry itself when it alone exceeds the budget."""
        self.pop(key)
        if entry.nbytes > self.budget:
            return [(key, entry)]
        entry = entry.to(self.device, pin=self.pin)
        evicted = []
        while self.used + entry.nbytes > self.budget:
            old_key, old = self.entries.popitem(last=False)
            self.used -= old.nbytes
            evicted.append((old_key, old))
        self.entries[key] = entry
        self.used += entry.nbytes
        return evicted


def _sha(*id_lists) -> str:
    h = hashlib.sha256()
    for ids in id_lists:
        h.update(json.dumps([int(t) for t in ids]).encode())
        h.update(b"|")
    return h.hexdigest()[:32]


class ChunkFileStore:
    """Directory of per-chunk caches for one model, with optional resident tiers (see module docstring).

    Entries missing from disk are computed by :meth:`_compute`, which a subclass that runs the model provides
    (:class:`kvpress_ext.presses.a3.ChunkStore`); here a missing entry raises :class:`CacheFormatError`.

    Parameters
    ----------
    root: directory of the store (created on first write).
    model: the model the caches belong to (its fingerprint names the sub-directory).
    tokenizer: needed only to pass chunks as strings (encoded without special tokens).
    prefix_ids: shared prefix every chunk is encoded after; default ``[bos_token_id]`` when the model
        has one, else empty.
    save_surprisal: also compute and store per-token surprisal.
    recompute_bad: recompute (and overwrite) a corrupt or mismatched entry instead of raising.
    memory_bytes: byte budget of the resident tier on the model's device (0: every lookup reads the files).
    host_bytes: byte budget of a host-memory tier below it (pinned when CUDA is present) that takes what the first
        tier evicts; worth it when the model is on a GPU.
    """

    def __init__(self, root, model, tokenizer=None, prefix_ids=None, save_surprisal: bool = False,
                 recompute_bad: bool = False, memory_bytes: int = 0, host_bytes: int = 0):
        self.root = check_store_root(root, flag="ChunkStore root")
        self.model = model
        self.tokenizer = tokenizer
        if prefix_ids is None:
            bos = getattr(model.config, "bos_token_id", None)
            prefix_ids = [bos] if isinstance(bos, int) else []
        self.prefix_ids = [int(t) for t in prefix_ids]
        self.save_surprisal = save_surprisal
        self.recompute_bad = recompute_bad
        self.fingerprint = model_fingerprint(model)
        self.hits = 0
        self.misses = 0
        self.memory_hits = 0
        self._swept: set[Path] = set()
        self.tiers = [ResidentTier(memory_bytes, device=input_device(model))] if memory_bytes else []
        if host_bytes:
            self.tiers.append(ResidentTier(host_bytes, "cpu", pin=torch.cuda.is_available()))

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
        if not prefix:  # a model without BOS and no prefix given: there is nothing to encode
            raise ValueError("ChunkStore.prefix: the prefix is empty (the tokenizer adds no BOS and no prefix_ids "
                             "were given); callers fuse without a prefix cache then.")
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
    def _claim_root(self) -> None:
        if (self.root / STORE_MARKER).is_file():
            return
        with path_lock(self.root):
            if not (self.root / STORE_MARKER).is_file():
                check_store_root(self.root, flag="ChunkStore root")
                self.root.mkdir(parents=True, exist_ok=True)
                marker = json.dumps({"kind": STORE_KIND, "format": STORE_FORMAT}).encode()
                atomic_write_bytes(self.root / STORE_MARKER, marker)

    def _get(self, path: Path, ids, prefix, need_surprisal: bool) -> ChunkKV:
        entry = self._resident(path, need_surprisal)
        if entry is None:
            entry = self._get_stored(path, ids, prefix, need_surprisal)
            self._keep(0, path, entry)
            kept = self.tiers[0].get(path) if self.tiers else None
            entry = entry if kept is None else kept  # the resident copy (on the model's device)
        return entry

    def _resident(self, path: Path, need_surprisal: bool) -> ChunkKV | None:
        """The entry from the first tier that holds it, moved up to the first tier; None when none does."""
        for level, tier in enumerate(self.tiers):
            entry = tier.get(path)
            if entry is None or (need_surprisal and entry.surprisal is None):
                continue
            if level:
                tier.pop(path)
                self._keep(0, path, entry)
                kept = self.tiers[0].get(path)
                entry = entry if kept is None else kept
            self.hits += 1
            self.memory_hits += 1
            return entry
        return None

    def _keep(self, level: int, key, entry: ChunkKV) -> None:
        """Put ``entry`` in tier ``level``; what it evicts goes one tier down (below the last: files only)."""
        if level >= len(self.tiers):
            return
        for old_key, old in self.tiers[level].put(key, entry):
            self._keep(level + 1, old_key, old)

    def _get_stored(self, path: Path, ids, prefix, need_surprisal: bool) -> ChunkKV:
        if path.parent not in self._swept:
            sweep(path.parent)  # once per directory: finish or undo what killed writers left
            self._swept.add(path.parent)
        if path.exists():  # a hit needs no lock: entries appear by rename, complete
            try:
                entry = self._load(path, ids, prefix)
                if not (need_surprisal and entry.surprisal is None):
                    self.hits += 1
                    return entry
            except CacheFormatError:
                pass  # checked again under the lock (a writer may be replacing it right now)
        with ExitStack() as stack:
            try:
                self._claim_root()
                stack.enter_context(path_lock(path))  # one writer per entry; others wait, then reuse its result
                locked = True
            except OSError as exc:
                if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                    raise
                locked, why = False, exc.strerror or "not writable"  # a read-only store: report, compute nothing
            if locked and not path.exists():
                recover(path)  # a replacement killed between its renames: finish or undo it
            if path.exists() or not locked:
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
                except CacheFormatError as exc:
                    if not locked:
                        reason = str(exc).strip().replace(f"; {FIX}", "").rstrip(". ")
                        raise ReadOnlyStoreError(reason, self.root, why) from None
                    if not self.recompute_bad:
                        raise
            self.misses += 1
            entry = self._compute(ids, prefix, surprisal=self.save_surprisal or need_surprisal)
            self._save(path, entry)
            return entry

    def _compute(self, ids, prefix, surprisal: bool) -> ChunkKV:
        """Encode an entry with the model; a store that only reads has none to encode with."""
        where = self.chunk_path(ids, prefix) if ids else self.prefix_path(prefix)
        raise CacheFormatError(f"Chunk entry {where} is not stored and this store cannot encode chunks; precompute "
                               "it with kvpress_ext.presses.a3.ChunkStore")

    def _save(self, path: Path, entry: ChunkKV) -> None:
        """Write ``entry`` at ``path`` (called holding the entry's lock)."""
        tensors = {}
        for i, (k, v) in enumerate(zip(entry.keys, entry.values)):
            tensors[f"layer{i}.keys"], tensors[f"layer{i}.values"] = k, v
        if entry.surprisal is not None:
            tensors["surprisal"] = entry.surprisal.float().contiguous()
        check_finite(tensors, f"Chunk entry {path} (not saved)", "the model produced them; check the dtype and inputs")
        meta = {
            "kind": ENTRY_KIND,
            "format": STORE_FORMAT,
            "model_fingerprint": self.fingerprint,
            "model_name": getattr(self.model.config, "_name_or_path", None),
            "token_ids": entry.token_ids,
            "prefix_len": entry.prefix_len,
            "num_layers": len(entry.keys),
            "key_layout": "post-rope at local positions prefix_len + j",
            "dtype": str(entry.keys[0].dtype),
            "checksums": {},
        }

        def write(tmp: Path):
            save_file(tensors, str(tmp / TENSORS))
            meta["checksums"][TENSORS] = file_checksum(tmp / TENSORS)
            (tmp / META).write_text(json.dumps(meta))

        replace_directory(path, write)

    def _load(self, path: Path, ids, prefix) -> ChunkKV:
        where = f"Chunk entry {path}"
        if not path.is_dir():
            raise CacheFormatError(f"{where} is missing or not a directory; {FIX}.")
        meta = read_json_object(path / META, where, FIX)
        check_version(meta.get("format"), KNOWN_FORMATS, where, FIX)
        check_fields(meta, _ENTRY_SCHEMA, where, FIX)
        expected_ids = list(ids) if ids else list(prefix)
        expected_prefix = len(prefix) if ids else 0
        problems = []
        if meta["model_fingerprint"] != self.fingerprint:
            problems.append(f"model fingerprint {meta['model_fingerprint']} != {self.fingerprint}")
        if meta["token_ids"] != expected_ids:
            problems.append("stored token ids differ from the chunk's")
        if meta["prefix_len"] != expected_prefix:
            problems.append(f"prefix length {meta['prefix_len']} != {expected_prefix}")
        n_layers = len(get_adapter(self.model).layers(self.model))
        if meta["num_layers"] != n_layers:
            problems.append(f"{meta['num_layers']} layers stored, model has {n_layers}")
        if problems:
            raise CacheFormatError(f"{where} does not match: {'; '.join(problems)}; {FIX}.")
        tensors = read_verified_tensors(path / TENSORS, meta["checksums"][TENSORS], where, FIX)
        names = {f"layer{i}.{kind}" for i in range(n_layers) for kind in ("keys", "values")}
        if not names <= set(tensors) or set(tensors) - names - {"surprisal"}:
            raise CacheFormatError(f"{where}: {TENSORS} holds other tensors than a chunk entry has; {FIX}.")
        check_finite(tensors, where, FIX)
        check_kv_tensors([(tensors[f"layer{i}.keys"], tensors[f"layer{i}.values"]) for i in range(n_layers)],
                         [len(expected_ids)] * n_layers, self.model, where, FIX + ".")
        keys, values = [], []
        for i in range(n_layers):
            k, v = tensors[f"layer{i}.keys"], tensors[f"layer{i}.values"]
            if k.dim() != 4 or v.dim() != 4 or k.shape[-2] != len(expected_ids) or v.shape[-2] != len(expected_ids):
                raise CacheFormatError(f"{where}: layer {i} tensors have the wrong shape; {FIX}.")
            keys.append(k)
            values.append(v)
        surprisal = tensors.get("surprisal")
        if surprisal is not None and (surprisal.dim() != 1 or not surprisal.is_floating_point()
                                      or surprisal.numel() != len(expected_ids)):
            raise CacheFormatError(f"{where}: surprisal has {surprisal.numel()} values, "
                                   f"chunk has {len(expected_ids)} tokens; {FIX}.")
        entry = ChunkKV(expected_ids, keys, values, expected_prefix, surprisal)
        entry.stacked()  # one copy now, so fusion moves each chunk in one operation
        return entry
