"""kvpress-ext: plugin-based KV-cache compression and reuse for Hugging Face transformers.

Three lines::

    import kvpress_ext
    pipe = pipeline("kv-press-text-generation", model=path, press=kvpress_ext.get_press("knorm", compression_ratio=0.5))
    pipe(context, question=question)["answer"]
"""

from kvpress_ext.errors import (
    CacheFormatError,
    KVPressExtError,
    PressParameterError,
    UnknownPressError,
    UnsupportedModelError,
)
from kvpress_ext.hookspecs import hookimpl
from kvpress_ext.registry import add_press, available_presses, get_press, press_info, press_name, register_press
from kvpress_ext.adapters import ModelAdapter, add_adapter, available_adapters, get_adapter  # noqa: E402
from kvpress_ext.apply import apply_press, compression_phases  # noqa: E402
from kvpress_ext.positions import next_position, position_state, set_next_position  # noqa: E402
from kvpress_ext.pipeline import KVPressExtPipeline  # noqa: E402  (registers the pipeline task)

__version__ = "0.1.0"

__all__ = [
    "CacheFormatError", "KVPressExtError", "PressParameterError", "UnknownPressError", "UnsupportedModelError",
    "hookimpl", "add_press", "available_presses", "get_press", "press_info", "press_name", "register_press",
    "ModelAdapter", "add_adapter", "available_adapters", "get_adapter", "apply_press", "compression_phases",
    "next_position", "position_state", "set_next_position", "KVPressExtPipeline",
]
