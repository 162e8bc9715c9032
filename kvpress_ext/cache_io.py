"""Save and load KV caches: safetensors tensors plus ``metadata.json``, written atomically.

A saved cache is a directory::

    cache_dir/
        tensors.safetensors   layer{i}.keys / layer{i}.values (no pickle)
        metadata.json         format version, per-layer lengths, position state, press, token ids,
                              model name and config fingerprint, caller's extra fields

Writes go to a temporary sibling directory that is renamed into place, so a crash never leaves a
half-written cache. Loading checks the format version, the model fingerprint and every tensor, and
restores the :class:`~kvpress_ext.positions.PositionState`, so generation continues with identical logits.
Used by the compress-in-context workflow and by A3's chunk store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import DynamicCache

from kvpress_ext.errors import CacheFormatError
from kvpress_ext.positions import PositionState, position_state

FORMAT_VERSION = 1
TENSORS_FILE = "tensors.safetensors"
METADATA_FILE = "metadata.json"

_FINGERPRINT_KEYS = (
    "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "rope_theta", "rope_parameters", "rotary_pct", "intermediate_size", "max_position_embeddings",
)


def model_fingerprint(model_or_config, include_weights: bool = False) -> str:
    """A short hash of the config fields that decide the cache layout (and, optionally, of some weights).

    ``include_weights`` hashes a sample of the embedding weights too, so two random models with the same
    config are told apart (chunk stores use it).
    """
    config = getattr(model_or_config, "config", model_or_config)
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    payload = {k: d.get(k) for k in _FINGERPRINT_KEYS if k in d}
    h = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode())
    if include_weights and hasattr(model_or_config, "get_input_embeddings"):
        w = model_or_config.get_input_embeddings().weight.detach()
        h.update(w.flatten()[:4096].to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def press_description(press) -> dict | None:
    """Name and parameters of a press, JSON-safe (inner presses as nested descriptions)."""
    if press is None:
        return None
    from kvpress_ext.registry import press_name

    params = {}
    if dataclasses.is_dataclass(press):
        for f in dataclasses.fields(press):
            if not f.init:
                continue
            value = getattr(press, f.name, None)
            params[f.name] = _json_safe(value)
    return {"name": press_name(press), "class": type(press).__name__, "params": params}


def _json_safe(value: Any):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return press_description(value)
    return repr(value)


def atomic_directory_write(path: Path, write_fn) -> None:
    """Call ``write_fn(tmp_dir)``, then move ``tmp_dir`` to ``path`` (replacing it) in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write_fn(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_cache(
    cache, path, *, model=None, token_ids=None, press=None, extra: dict | None = None
) -> Path:
    """Save ``cache`` (a transformers DynamicCache, any press's result) to directory ``path``."""
    tensors, lengths = {}, []
    for i, layer in enumerate(cache.layers):
        keys, values = layer.keys, layer.values
        if keys is None or not isinstance(keys, torch.Tensor):
            raise CacheFormatError(f"Layer {i} of the cache is empty; run a forward pass before saving it.")
        tensors[f"layer{i}.keys"] = keys.detach().contiguous().cpu()
        tensors[f"layer{i}.values"] = values.detach().contiguous().cpu()
        lengths.append(int(keys.shape[-2]))
    state = position_state(cache)
    config = getattr(model, "config", None)
    metadata = {
        "format_version": FORMAT_VERSION,
        "num_layers": len(lengths),
        "seq_lengths": lengths,
        "positions": dataclasses.asdict(state),
        "press": press_description(press),
        "token_ids": [int(t) for t in token_ids] if token_ids is not None else None,
        "model_name": getattr(config, "_name_or_path", None) if config is not None else None,
        "model_fingerprint": model_fingerprint(model) if model is not None else None,
        "dtype": str(next(iter(tensors.values())).dtype) if tensors else None,
        "extra": _json_safe(extra or {}),
    }

    def write(tmp: Path):
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format_version": str(FORMAT_VERSION)})
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2))

    atomic_directory_write(Path(path), write)
    return Path(path)


def read_metadata(path) -> dict:
    """The metadata of a saved cache, with clear errors for a missing or newer-format cache."""
    path = Path(path)
    meta_file = path / METADATA_FILE
    if not meta_file.is_file():
        raise CacheFormatError(
            f"No saved cache at {path} (missing {METADATA_FILE}). Create one first, e.g. with "
            f"`kvpress-ext icl precompute --out {path}` or kvpress_ext.cache_io.save_cache."
        )
    try:
        metadata = json.loads(meta_file.read_text())
    except json.JSONDecodeError as exc:
        raise CacheFormatError(f"{meta_file} is not valid JSON ({exc}); the cache is corrupt: recompute it.") from exc
    version = metadata.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CacheFormatError(
            f"Cache at {path} has format version {version!r}, newer than this kvpress_ext understands "
            f"({FORMAT_VERSION}). Upgrade kvpress-ext, or recompute the cache."
        )
    return metadata


def load_cache(path, model=None, device=None, dtype=None) -> tuple[DynamicCache, dict]:
    """Load a cache saved by :func:`save_cache`; returns ``(cache, metadata)``.

    With ``model``, its config fingerprint must match the one saved (a cache from another model
    would give silently wrong answers).
    """
    path = Path(path)
    metadata = read_metadata(path)
    if model is not None and metadata.get("model_fingerprint") not in (None, model_fingerprint(model)):
        raise CacheFormatError(
            f"Cache at {path} was made with another model ({metadata.get('model_name')!r}, fingerprint "
            f"{metadata['model_fingerprint']}) than the one given (fingerprint {model_fingerprint(model)}). "
            "Load it with the model that made it, or recompute it."
        )
    tensor_file = path / TENSORS_FILE
    if not tensor_file.is_file():
        raise CacheFormatError(f"Cache at {path} lacks {TENSORS_FILE}; it is incomplete: recompute it.")
    try:
        tensors = load_file(str(tensor_file), device=str(device) if device is not None else "cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CacheFormatError(f"Cannot read {tensor_file} ({exc}); the file is truncated or corrupt: recompute it.") from exc
    cache = DynamicCache()
    for i, length in enumerate(metadata["seq_lengths"]):
        try:
            keys, values = tensors[f"layer{i}.keys"], tensors[f"layer{i}.values"]
        except KeyError as exc:
            raise CacheFormatError(f"Cache at {path} misses tensor {exc}; recompute it.") from exc
        if keys.shape[-2] != length or values.shape[-2] != length:
            raise CacheFormatError(
                f"Cache at {path}: layer {i} holds {keys.shape[-2]} keys and {values.shape[-2]} values, metadata "
                f"says {length} tokens; the cache is corrupt: recompute it."
            )
        if dtype is not None:
            keys, values = keys.to(dtype), values.to(dtype)
        cache.update(keys, values, i)
    positions = metadata.get("positions")
    if positions is not None:  # without it (a hand-made file) the state follows the cache length
        position_state(cache).__dict__.update(dataclasses.asdict(PositionState(**positions)))
    return cache, metadata
