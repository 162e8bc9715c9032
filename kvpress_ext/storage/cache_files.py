"""Save and load KV caches: safetensors tensors plus ``metadata.json``, written atomically, verified on load.

A saved cache is a directory::

    cache_dir/
        tensors.safetensors   layer{i}.keys / layer{i}.values (no pickle)
        metadata.json         format version, per-layer lengths, position state, press, token ids, model name,
                              model fingerprint (config + weights), checksum of the tensor file, caller's extra fields

Writes follow :mod:`kvpress_ext.storage.safe_write`: only into a missing path, an empty directory or one of our caches,
through a temporary sibling swapped in under a lock, so a crash never leaves a half-written cache and a user's
file is never replaced. Loading validates the metadata (exact keys and types), accepts only known format
versions, requires the fingerprint of the model given, checks the tensor file's checksum, refuses NaN/Inf, and
restores the :class:`~kvpress_ext.core.positions.PositionState`, so generation continues with identical logits.
Used by the compress-in-context workflow; A3's chunk store shares the fingerprint and integrity helpers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file
from transformers import DynamicCache

from kvpress_ext.core.devices import layer_devices, parameter_values
from kvpress_ext.core.errors import CacheFormatError
from kvpress_ext.core.positions import PositionState, position_state
from kvpress_ext.storage.cache_contents import (  # noqa: F401 - part of this module's interface
    check_kv_tensors,
    json_safe,
    kv_geometry,
    press_description,
    press_from_description,
)
from kvpress_ext.storage.inputs import JSONInputError, load_json
from kvpress_ext.storage.safe_write import check_target_dir, is_ours, path_lock, recover, replace_directory, try_lock

FORMAT_VERSION = 2
KNOWN_VERSIONS = (2,)
CACHE_KIND = "kvpress_ext.kv_cache"
TENSORS_FILE = "tensors.safetensors"
METADATA_FILE = "metadata.json"

_FINGERPRINT_KEYS = (
    "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "rope_theta", "rope_parameters", "rotary_pct", "intermediate_size", "max_position_embeddings",
)
_SAMPLES_PER_TENSOR = 64


@torch.no_grad()
def model_fingerprint(model) -> str:
    """A short hash of the config fields that decide the cache layout and of the weights.

    The one fingerprint of saved caches and A3 chunk stores. For the weights it hashes every parameter's name,
    shape, dtype and 64 evenly strided values (as float32), so a model with the same config but other weights
    (another checkpoint, a fine-tune, a random model with another seed) gets another fingerprint; the cost is
    one small gather per parameter (no pass over the weights). Weights offloaded by accelerate (``meta`` device)
    are read from its offload store, so a split model has the fingerprint of the same model on one device.
    Given a bare config, only the config counts.
    """
    config = getattr(model, "config", model)
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    payload = {k: d.get(k) for k in _FINGERPRINT_KEYS if k in d}
    h = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode())
    if hasattr(model, "named_parameters"):
        for name, p in model.named_parameters():
            h.update(f"|{name}|{tuple(p.shape)}|{p.dtype}|".encode())
            if p.device.type == "meta":  # offloaded by accelerate: read the values from its offload store
                p = parameter_values(model, name)
            if p is None or p.device.type == "meta" or p.numel() == 0:
                continue
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // _SAMPLES_PER_TENSOR)][:_SAMPLES_PER_TENSOR]
            h.update(sample.to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# --- integrity helpers (shared with A3's chunk store) ---------------------------------------------------------------
def _hasher(algorithm: str):
    if algorithm == "xxh3_128":
        import xxhash

        return xxhash.xxh3_128()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(algorithm)


def _default_algorithm() -> str:
    try:
        import xxhash  # noqa: F401 - installed with datasets (a dependency); 15-40x faster than sha256

        return "xxh3_128"
    except ImportError:
        return "sha256"


CHECKSUM_ALGORITHMS = ("xxh3_128", "sha256")


def checksum_bytes(data: bytes, algorithm: str | None = None) -> str:
    """``<algorithm>:<hex>`` of ``data``: xxh3_128 (fast, non-cryptographic) when xxhash is installed, else sha256.

    It detects corruption (bit rot, truncation, a half-copied file), not forgery: whoever can edit the tensor file
    can edit the metadata next to it. Cost per MB: docs/results/integrity.md.
    """
    algorithm = algorithm or _default_algorithm()
    h = _hasher(algorithm)
    h.update(data)
    return f"{algorithm}:{h.hexdigest()}"


def file_checksum(path, algorithm: str | None = None) -> str:
    """:func:`checksum_bytes` of a file, read in 1 MiB blocks."""
    algorithm = algorithm or _default_algorithm()
    h = _hasher(algorithm)
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return f"{algorithm}:{h.hexdigest()}"


def is_checksum(value) -> bool:
    return isinstance(value, str) and value.partition(":")[0] in CHECKSUM_ALGORITHMS and len(value.partition(":")[2]) >= 32


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def _parse_safetensors(buf: bytearray) -> dict[str, torch.Tensor]:
    """Tensors viewing ``buf`` (a whole safetensors file) without copying; ValueError when it is malformed.

    Why not ``safetensors.torch.load``: it copies every tensor out of the bytes once more, which doubled the load
    time of A3 chunk entries (a cost inside the measured time to first token).
    """
    if sys.byteorder != "little":
        return safetensors_load(bytes(buf))
    if len(buf) < 8:
        raise ValueError("shorter than the 8-byte header length")
    n = int.from_bytes(buf[:8], "little")
    if n > len(buf) - 8:
        raise ValueError("header length beyond the end of the file")
    try:
        header = load_json(bytes(buf[8 : 8 + n]))
    except ValueError:
        raise ValueError("header is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")  # noqa: TRY004 - reported as one "malformed file" error
    base, size, out, spans = 8 + n, len(buf) - 8 - n, {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(x) for x in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {name!r} has an unknown dtype or a malformed entry") from None
        count = math.prod(shape)
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= size or end - begin != count * dtype.itemsize:
            raise ValueError(f"tensor {name!r} lies outside the data or disagrees with its shape")
        spans.append((begin, end, name))
        if count == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        else:
            out[name] = torch.frombuffer(buf, dtype=dtype, count=count, offset=base + begin).view(shape)
    spans.sort()
    for (_, end, first), (begin, _, second) in itertools.pairwise(spans):
        if begin < end:  # two names for the same bytes: one write through either would change both
            raise ValueError(f"tensors {first!r} and {second!r} share bytes")
    return out


def read_verified_tensors(path: Path, expected: str, where: str, fix: str, device=None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file whose checksum must be ``expected``; never a pickle, one-line errors.

    The file is read once into memory, hashed, then parsed in place: the tensors do not map the file (a later
    change to it cannot reach them) and what is checked is what is used.
    """
    try:
        with open(path, "rb") as fh:
            buf = bytearray(os.fstat(fh.fileno()).st_size)
            view, got = memoryview(buf), 0
            while got < len(buf) and (n := fh.readinto(view[got:])):
                got += n
    except OSError as exc:
        raise CacheFormatError(f"{where}: cannot read {path.name} ({exc.strerror}); {fix}") from None
    if got != len(buf):
        raise CacheFormatError(f"{where}: {path.name} changed while it was read; {fix}")
    algorithm = expected.partition(":")[0]
    try:
        actual = checksum_bytes(buf, algorithm)
    except (ValueError, ImportError):
        raise CacheFormatError(f"{where}: checksum algorithm {algorithm!r} is unknown here; {fix}") from None
    if actual != expected:
        raise CacheFormatError(f"{where}: {path.name} does not match its checksum (corrupt or changed on disk); {fix}")
    try:
        tensors = _parse_safetensors(buf)
    except (SafetensorError, ValueError) as exc:
        raise CacheFormatError(f"{where}: cannot read {path.name} ({exc}); the file is not a valid safetensors "
                               f"file; {fix}") from None
    if device is not None:
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors


def check_finite(tensors: dict[str, torch.Tensor], where: str, fix: str) -> None:
    """Raise :class:`CacheFormatError` when a floating tensor holds NaN or Inf.

    One ``aminmax`` per tensor: NaN propagates to both ends and an infinity is an end, so both ends are finite
    exactly when every value is (a single vectorised pass, 50-100x cheaper than ``isfinite(t).all()``).
    """
    for name, t in tensors.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        lo, hi = torch.aminmax(t)
        if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
            raise CacheFormatError(f"{where}: tensor {name} holds NaN or Inf values; {fix}")


def check_version(value, known: tuple[int, ...], where: str, fix: str, newer_fix: str = "upgrade kvpress-ext") -> int:
    """Accept only a known integer format version; anything else is "unknown" (or "newer"/"older")."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CacheFormatError(f"{where} has unknown format version {value!r} (this kvpress_ext reads "
                               f"{', '.join(map(str, known))}); {fix}")
    if value > max(known):
        raise CacheFormatError(f"{where} has format version {value}, newer than this kvpress_ext understands "
                               f"({max(known)}); {newer_fix}, or {fix}")
    if value not in known:
        raise CacheFormatError(f"{where} has format version {value}, older than this kvpress_ext reads "
                               f"({', '.join(map(str, known))}); {fix}")
    return value


def read_json_object(path: Path, where: str, fix: str) -> dict:
    """A JSON object from ``path``; a pickle, binary, a list or invalid JSON is a one-line error."""
    try:
        data = load_json(path.read_bytes(), f"{where}: {path.name}")
    except FileNotFoundError:
        raise CacheFormatError(f"{where}: {path.name} is missing; {fix}") from None
    except OSError as exc:
        raise CacheFormatError(f"{where}: cannot read {path.name} ({exc.strerror}); {fix}") from None
    except JSONInputError as exc:
        raise CacheFormatError(f"{where}: {path.name} {exc.reason}; {fix}") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError (a pickle, binary junk)
        raise CacheFormatError(f"{where}: {path.name} is not valid JSON ({str(exc)[:80]}); {fix}") from None
    if not isinstance(data, dict):
        raise CacheFormatError(f"{where}: {path.name} holds a JSON {type(data).__name__}, not an object; {fix}")
    return data


def is_int(x, minimum: int = 0) -> bool:
    """An int (not a bool) in [minimum, 2**62]: no count, position or token id of ours is larger."""
    return isinstance(x, int) and not isinstance(x, bool) and minimum <= x <= 1 << 62


def check_fields(meta: dict, schema: dict[str, Any], where: str, fix: str) -> None:
    """``schema`` maps each key to a predicate; missing, extra or ill-typed keys are one error naming them."""
    missing = [k for k in schema if k not in meta]
    extra = [k for k in meta if k not in schema]
    bad = [k for k, ok in schema.items() if k in meta and not ok(meta[k])]
    problems = ([f"missing {', '.join(missing)}"] if missing else []) + (
        [f"unexpected {', '.join(extra)}"] if extra else []) + ([f"invalid {', '.join(bad)}"] if bad else [])
    if problems:
        raise CacheFormatError(f"{where}: {METADATA_FILE} is not valid ({'; '.join(problems)}); {fix}")


def atomic_directory_write(path: Path, write_fn) -> None:
    """Call ``write_fn(tmp_dir)``, then swap ``tmp_dir`` in at ``path`` under its lock (no ownership check).

    Low level: callers check first that ``path`` is theirs to replace (see :func:`check_cache_target`).
    """
    path = Path(path)
    with path_lock(path):
        recover(path)
        replace_directory(path, write_fn)


# --- whose directory is it? ----------------------------------------------------------------------------------------
def is_our_cache_dir(path) -> bool:
    """True for a directory whose contents prove it is one of our saved caches (:func:`~kvpress_ext.storage.
    safe_write.is_ours`: our metadata kind, or a damaged cache's two files with our tensor header) and not
    another kind of ours (a chunk store, a results directory). A folder merely holding a ``metadata.json`` is not."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        meta = load_json((path / METADATA_FILE).read_bytes())
    except (OSError, ValueError):
        meta = None
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if kind == CACHE_KIND or (isinstance(meta, dict) and {"format_version", "seq_lengths"} <= set(meta) and not kind):
        return True  # ours, or a cache from before the kind was written (format 1)
    names = {p.name for p in path.iterdir()}
    return not kind and bool(names) and names <= {METADATA_FILE, TENSORS_FILE} and is_ours(path)


def check_cache_target(path, flag: str = "--out") -> Path:
    """Raise :class:`~kvpress_ext.storage.safe_write.OutputPathError` unless a cache may be written at ``path``: missing,
    an empty directory, or one of our caches. Nothing is written."""
    return check_target_dir(
        path, flag=flag, ours=is_our_cache_dir, what="a kvpress-ext cache", refuse_symlinks=True,
        symlink_fix="pass a new directory path for the cache",
        file_error="is an existing file, not a kvpress-ext cache; pass a new directory path (nothing was written)",
    )


# --- save / load ---------------------------------------------------------------------------------------------------
def save_cache(
    cache, path, *, model=None, token_ids=None, press=None, extra: dict | None = None
) -> Path:
    """Save ``cache`` (a transformers DynamicCache, any press's result) to directory ``path``.

    ``path`` must be missing, empty or one of our caches (which is then replaced); ``model`` is required, its
    fingerprint is what :func:`load_cache` checks.
    """
    if model is None:
        raise CacheFormatError("save_cache needs the model that made the cache (model=...): its fingerprint is "
                               "saved so the cache is never loaded into another model.")
    path = check_cache_target(path)
    tensors, lengths = {}, []
    for i, layer in enumerate(cache.layers):
        keys, values = layer.keys, layer.values
        if keys is None or not isinstance(keys, torch.Tensor):
            raise CacheFormatError(f"Layer {i} of the cache is empty; run a forward pass before saving it.")
        tensors[f"layer{i}.keys"] = keys.detach().contiguous().cpu()
        tensors[f"layer{i}.values"] = values.detach().contiguous().cpu()
        lengths.append(int(keys.shape[-2]))
    if not tensors:
        raise CacheFormatError("The cache has no layers; run a forward pass before saving it.")
    check_finite(tensors, "The cache to save", "not saved: the model produced them (check the dtype and inputs)")
    state = position_state(cache)
    metadata = {
        "kind": CACHE_KIND,
        "format_version": FORMAT_VERSION,
        "num_layers": len(lengths),
        "seq_lengths": lengths,
        "positions": dataclasses.asdict(state),
        "press": press_description(press),
        "token_ids": [int(t) for t in token_ids] if token_ids is not None else None,
        "model_name": getattr(model.config, "_name_or_path", None),
        "model_fingerprint": model_fingerprint(model),
        "dtype": str(next(iter(tensors.values())).dtype),
        "checksums": {},
        "extra": json_safe(extra or {}),
    }

    def write(tmp: Path):
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format_version": str(FORMAT_VERSION)})
        metadata["checksums"][TENSORS_FILE] = file_checksum(tmp / TENSORS_FILE)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2))

    with path_lock(path):
        recover(path)
        check_cache_target(path)  # again, under the lock
        replace_directory(path, write)
    return path


def _fix(path) -> str:
    return f"recompute it (`kvpress-ext icl precompute --out {path} --recompute ...`)"


_POSITION_KEYS = {f.name for f in dataclasses.fields(PositionState)}
_SCHEMA = {
    "kind": lambda v: v == CACHE_KIND,
    "format_version": is_int,
    "num_layers": lambda v: is_int(v, 1),
    "seq_lengths": lambda v: isinstance(v, list) and bool(v) and all(is_int(x) for x in v),
    "positions": lambda v: isinstance(v, dict) and set(v) == _POSITION_KEYS and is_int(v["next_position"])
    and is_int(v["seen_tokens"]) and isinstance(v["rotated"], bool),
    "press": lambda v: v is None or (isinstance(v, dict) and isinstance(v.get("name"), str)
                                     and isinstance(v.get("params"), dict)),
    "token_ids": lambda v: v is None or (isinstance(v, list) and all(is_int(x) for x in v)),
    "model_name": lambda v: v is None or isinstance(v, str),
    "model_fingerprint": lambda v: isinstance(v, str) and len(v) == 16 and all(c in "0123456789abcdef" for c in v),
    "dtype": lambda v: isinstance(v, str),
    "checksums": lambda v: isinstance(v, dict) and set(v) == {TENSORS_FILE} and is_checksum(v[TENSORS_FILE]),
    "extra": lambda v: isinstance(v, dict),
}


def read_metadata(path) -> dict:
    """The validated metadata of a saved cache: one-line errors for a missing, damaged or unknown-format cache.

    Opening a cache also finishes an interrupted ``--recompute`` swap and removes stale temporaries (when no
    other process is writing it).
    """
    path = Path(path)
    with try_lock(path) as locked:
        if locked:
            recover(path)
    meta_file = path / METADATA_FILE
    if path.exists() and not path.is_dir():
        raise CacheFormatError(f"{path} is a file, not a saved cache (a directory); pass the cache directory.")
    if not meta_file.is_file():
        raise CacheFormatError(
            f"No saved cache at {path} (missing {METADATA_FILE}). Create one first, e.g. with "
            f"`kvpress-ext icl precompute --out {path}` or kvpress_ext.storage.cache_files.save_cache."
        )
    where, fix = f"Cache at {path}", _fix(path)
    metadata = read_json_object(meta_file, where, fix)
    check_version(metadata.get("format_version"), KNOWN_VERSIONS, where, fix)
    check_fields(metadata, _SCHEMA, where, fix)
    if len(metadata["seq_lengths"]) != metadata["num_layers"]:
        raise CacheFormatError(f"{where}: {METADATA_FILE} lists {len(metadata['seq_lengths'])} layer lengths for "
                               f"{metadata['num_layers']} layers; {fix}")
    return metadata


def load_cache(path, model=None, device=None, dtype=None) -> tuple[DynamicCache, dict]:
    """Load a cache saved by :func:`save_cache`; returns ``(cache, metadata)``.

    With ``model``, its fingerprint (config and weights) must match the one saved: a cache from another model
    would give silently wrong answers. The tensor file must match its checksum and hold only finite values.
    Each layer goes to that layer's device (models split with a ``device_map`` included) unless ``device``
    says where.
    """
    path = Path(path)
    metadata = read_metadata(path)
    where, fix = f"Cache at {path}", _fix(path)
    if model is not None and metadata["model_fingerprint"] != model_fingerprint(model):
        raise CacheFormatError(
            f"{where} was made with another model ({metadata.get('model_name')!r}, fingerprint "
            f"{metadata['model_fingerprint']}) than the one given (fingerprint {model_fingerprint(model)}). "
            "Load it with the model that made it, or recompute it."
        )
    tensor_file = path / TENSORS_FILE
    if not tensor_file.is_file():
        raise CacheFormatError(f"{where} lacks {TENSORS_FILE}; it is incomplete: {fix}")
    tensors = read_verified_tensors(tensor_file, metadata["checksums"][TENSORS_FILE], where, fix)
    expected = {f"layer{i}.{kind}" for i in range(metadata["num_layers"]) for kind in ("keys", "values")}
    if set(tensors) != expected:
        raise CacheFormatError(f"{where}: {TENSORS_FILE} holds other tensors than {METADATA_FILE} lists; {fix}")
    check_finite(tensors, where, fix)
    check_kv_tensors([(tensors[f"layer{i}.keys"], tensors[f"layer{i}.values"]) for i in range(metadata["num_layers"])],
                     metadata["seq_lengths"], model, where, fix)
    cache = DynamicCache()
    devices = None
    if device is None and model is not None:
        devices = layer_devices(model)
    for i, length in enumerate(metadata["seq_lengths"]):
        keys, values = tensors[f"layer{i}.keys"], tensors[f"layer{i}.values"]
        if keys.dim() != 4 or keys.shape[:3] != values.shape[:3] or keys.shape[-2] != length:
            raise CacheFormatError(f"{where}: layer {i} holds tensors of shape {tuple(keys.shape)} / "
                                   f"{tuple(values.shape)}, metadata says {length} tokens; {fix}")
        if device is not None:
            keys, values = keys.to(device), values.to(device)
        if dtype is not None:
            keys, values = keys.to(dtype), values.to(dtype)
        if devices is not None and i < len(devices):
            keys, values = keys.to(devices[i]), values.to(devices[i])
        cache.update(keys, values, i)
    state = PositionState(**metadata["positions"])
    position_state(cache).__dict__.update(dataclasses.asdict(state))
    return cache, metadata
