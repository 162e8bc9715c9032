"""What a saved cache holds, checked against the model that loads it: its tensors' geometry and its press.

Shared by saved caches (:mod:`kvpress_ext.storage.cache_files`) and A3 chunk entries: a crafted file whose checksum
is valid still has to fit the model (layers, heads, head size, dtype, token counts), and a press read back from a
file is rebuilt through the registry, with the same range checks as a command line's parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from kvpress_ext.core.errors import CacheFormatError, KVPressExtError
from kvpress_ext.core.registry import get_press, press_name


def kv_geometry(model) -> dict:
    """What a KV cache of ``model`` must look like: ``layers``, ``heads`` (key/value heads), ``head_dim`` (each
    None where the config does not say)."""
    config = getattr(model, "config", model)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None)
    if not head_dim and getattr(config, "hidden_size", None) and getattr(config, "num_attention_heads", None):
        head_dim = config.hidden_size // config.num_attention_heads
    return {"layers": getattr(config, "num_hidden_layers", None), "heads": heads, "head_dim": head_dim}


def check_kv_tensors(pairs: list[tuple[torch.Tensor, torch.Tensor]], lengths: list[int], model, where: str,
                     fix: str) -> None:
    """Raise :class:`CacheFormatError` unless the loaded ``(keys, values)`` per layer fit ``model`` and the
    metadata's ``lengths``: one pair per layer of the model, floating point, 4-D ``(batch, heads, tokens,
    head_dim)`` with the model's head count and head size, at least one token, as many as the metadata says.

    The one check of loaded tensors against the model (saved caches and A3 chunk entries): a crafted file with a
    valid checksum must fail here, in one line, not later in a matmul or, worse, answer with wrong numbers."""
    shape = kv_geometry(model) if model is not None else {"layers": None, "heads": None, "head_dim": None}
    if shape["layers"] and len(pairs) != shape["layers"]:
        raise CacheFormatError(f"{where} holds {len(pairs)} layers, the model has {shape['layers']}; {fix}")
    for i, ((k, v), length) in enumerate(zip(pairs, lengths)):
        if not (k.is_floating_point() and v.is_floating_point()):
            raise CacheFormatError(f"{where}: layer {i} holds {k.dtype}/{v.dtype} tensors, not floating point; {fix}")
        if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
            raise CacheFormatError(f"{where}: layer {i} holds tensors of shape {tuple(k.shape)} / {tuple(v.shape)}, "
                                   f"not (batch, heads, tokens, head_dim) each; {fix}")
        if k.shape[-2] != length or length < 1:
            raise CacheFormatError(f"{where}: layer {i} holds {k.shape[-2]} tokens, the metadata says {length} "
                                   f"(a cache needs at least one); {fix}")
        if shape["heads"] and k.shape[1] != shape["heads"]:
            raise CacheFormatError(f"{where}: layer {i} has {k.shape[1]} key/value heads, the model "
                                   f"{shape['heads']}; {fix}")
        if shape["head_dim"] and k.shape[-1] != shape["head_dim"]:
            raise CacheFormatError(f"{where}: layer {i} has head size {k.shape[-1]}, the model "
                                   f"{shape['head_dim']}; {fix}")


def press_description(press) -> dict | None:
    """Name and parameters of a press, JSON-safe (inner presses as nested descriptions)."""
    if press is None:
        return None
    params = {}
    if dataclasses.is_dataclass(press):
        for f in dataclasses.fields(press):
            if not f.init:
                continue
            value = getattr(press, f.name, None)
            params[f.name] = json_safe(value)
    return {"name": press_name(press), "class": type(press).__name__, "params": params}


def press_from_description(description: dict, where: str, fix: str):
    """The press :func:`press_description` described, rebuilt through the registry (so its parameters get the
    same range checks as a command line's: a saved file is untrusted input); inner presses too."""
    def build(desc):
        params = {k: build(v) if isinstance(v, dict) and isinstance(v.get("name"), str) and "params" in v else v
                  for k, v in (desc.get("params") or {}).items()}
        return get_press(desc["name"], **params)

    try:
        return build(description)
    except KVPressExtError as exc:
        raise CacheFormatError(f"{where}: its saved press cannot be rebuilt ({str(exc).splitlines()[0]}); {fix}") \
            from None


def json_safe(value: Any):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return press_description(value)
    return repr(value)
