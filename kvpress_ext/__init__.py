"""kvpress-ext: plugin-based KV-cache compression and reuse for Hugging Face transformers.

Three lines (after one thread for torch: its default of a thread per core is several times slower on a busy
machine, docs/results/threads.md)::

    import kvpress_ext
    kvpress_ext.set_threads(1)
    model, tokenizer = kvpress_ext.load_model("smollm2-135m")  # a short name, a local directory or a hub id
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    pipe(context, question=question, press=kvpress_ext.get_press("knorm", compression_ratio=0.5))["answer"]
"""

from kvpress_ext import moved_modules
from kvpress_ext.core.adapters import ModelAdapter, add_adapter, available_adapters, get_adapter
from kvpress_ext.core.apply import apply_press
from kvpress_ext.core.contract import compression_phases
from kvpress_ext.core.errors import (
    CacheFormatError,
    KVPressExtError,
    PressParameterError,
    UnknownPressError,
    UnsupportedModelError,
)
from kvpress_ext.core.positions import next_position, position_state, set_next_position
from kvpress_ext.core.registry import add_press, available_presses, get_press, press_info, press_name, register_press
from kvpress_ext.core.tables import RegistrationConflict
from kvpress_ext.plugins.hookspecs import hookimpl
from kvpress_ext.plugins.loader import failed_plugins, load_plugins  # importing it installs the lazy plugin loader
from kvpress_ext.runtime.models import ModelLoadError, available_models, load_model, register_model, resolve_model
from kvpress_ext.runtime.pipeline import KVPressExtPipeline
from kvpress_ext.runtime.threads import set_threads

__version__ = "0.1.0"

moved_modules.install()  # old flat module paths (kvpress_ext.registry, ...) keep importing

__all__ = [
    "CacheFormatError",
    "KVPressExtError",
    "KVPressExtPipeline",
    "ModelAdapter",
    "ModelLoadError",
    "PressParameterError",
    "RegistrationConflict",
    "UnknownPressError",
    "UnsupportedModelError",
    "add_adapter",
    "add_press",
    "apply_press",
    "available_adapters",
    "available_models",
    "available_presses",
    "compression_phases",
    "failed_plugins",
    "get_adapter",
    "get_press",
    "hookimpl",
    "load_model",
    "load_plugins",
    "next_position",
    "position_state",
    "press_info",
    "press_name",
    "register_model",
    "register_press",
    "resolve_model",
    "set_next_position",
    "set_threads",
]
