"""The built-in plugin: kvpress_ext registers its own presses, adapters and model short names through the same hooks a
third-party plugin uses (see :mod:`kvpress_ext.plugins.hookspecs`)."""

from __future__ import annotations

import importlib
import pkgutil

from kvpress_ext import presses
from kvpress_ext.core.adapters.gemma3 import Gemma3Adapter
from kvpress_ext.core.adapters.gpt_neox import GPTNeoXAdapter
from kvpress_ext.core.adapters.llama import LlamaFamilyAdapter
from kvpress_ext.core.kvpress_table import register_kvpress_presses
from kvpress_ext.plugins.hookspecs import hookimpl
from kvpress_ext.runtime.builtin_models import register_builtin_models


@hookimpl
def kvpress_ext_register_presses(register):
    register_kvpress_presses(register)
    # Our presses register themselves with @register_press when their module is imported.

    for module in pkgutil.walk_packages(presses.__path__, presses.__name__ + "."):
        importlib.import_module(module.name)


@hookimpl
def kvpress_ext_register_adapters(register):
    register(LlamaFamilyAdapter("llama", ("llama",)))
    register(LlamaFamilyAdapter("mistral", ("mistral",)))
    register(LlamaFamilyAdapter("qwen2", ("qwen2",)))
    register(LlamaFamilyAdapter("qwen3", ("qwen3",), qk_norm=True))
    register(GPTNeoXAdapter())
    register(Gemma3Adapter())


@hookimpl
def kvpress_ext_register_models(register):
    register_builtin_models(register)
