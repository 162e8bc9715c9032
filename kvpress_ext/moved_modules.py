"""Old module paths keep working: ``import kvpress_ext.registry`` gives ``kvpress_ext.core.registry``.

The package was regrouped into layers (docs/architecture.md); code written against the flat layout (a plugin
importing ``kvpress_ext.adapters``, a script importing ``kvpress_ext.models``) still imports, with one
``DeprecationWarning`` per old path naming the new one. The old name is the same module object as the new one, so
monkeypatching either affects both.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

#: old module path -> new module path
MOVED = {
    "kvpress_ext.errors": "kvpress_ext.core.errors",
    "kvpress_ext.registration": "kvpress_ext.core.tables",
    "kvpress_ext.registry": "kvpress_ext.core.registry",
    "kvpress_ext.kvpress_presses": "kvpress_ext.core.kvpress_table",
    "kvpress_ext.rope": "kvpress_ext.core.rope",
    "kvpress_ext.positions": "kvpress_ext.core.positions",
    "kvpress_ext.apply": "kvpress_ext.core.apply",
    "kvpress_ext.devices": "kvpress_ext.core.devices",
    "kvpress_ext.adapters": "kvpress_ext.core.adapters",
    "kvpress_ext.adapters.base": "kvpress_ext.core.adapters.base",
    "kvpress_ext.adapters.llama": "kvpress_ext.core.adapters.llama",
    "kvpress_ext.adapters.gpt_neox": "kvpress_ext.core.adapters.gpt_neox",
    "kvpress_ext.presses.temporal_order": "kvpress_ext.core.temporal_order",
    "kvpress_ext.safe_io": "kvpress_ext.storage.safe_write",
    "kvpress_ext.cache_io": "kvpress_ext.storage.cache_files",
    "kvpress_ext.inputs": "kvpress_ext.storage.inputs",
    "kvpress_ext.presses.a3.chunk_files": "kvpress_ext.storage.chunk_files",
    "kvpress_ext.threads": "kvpress_ext.runtime.threads",
    "kvpress_ext.models": "kvpress_ext.runtime.models",
    "kvpress_ext.model_sources": "kvpress_ext.runtime.builtin_models",
    "kvpress_ext.hub": "kvpress_ext.runtime.hub",
    "kvpress_ext.chat": "kvpress_ext.runtime.chat",
    "kvpress_ext.generate": "kvpress_ext.runtime.generate",
    "kvpress_ext.pipeline": "kvpress_ext.runtime.pipeline",
    "kvpress_ext.sweep": "kvpress_ext.evaluation.sweep",
    # evaluation as tasks, runners and reports: each old module is now its runner, which imports most of the
    # names the old module defined (the rest: evaluation.tasks, evaluation.reports, evaluation.press_setup)
    "kvpress_ext.evaluation.run_perplexity": "kvpress_ext.evaluation.runners.perplexity",
    "kvpress_ext.evaluation.longcontext_grid": "kvpress_ext.evaluation.runners.longcontext",
    "kvpress_ext.hookspecs": "kvpress_ext.plugins.hookspecs",
    "kvpress_ext.builtin_plugin": "kvpress_ext.plugins.builtin",
}


class _MovedFinder(importlib.abc.MetaPathFinder):
    """Finds an old path and hands out the module that lives at the new one."""

    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(fullname, new))


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, old: str, new: str):
        self.old, self.new = old, new

    def create_module(self, spec):
        warnings.warn(f"{self.old} moved to {self.new}; import it from there.", DeprecationWarning, stacklevel=4)
        return importlib.import_module(self.new)

    def exec_module(self, module):
        """Nothing to run: the module is the new one, already executed. The import system then binds it under the
        old name too (``sys.modules[old]``)."""


def install() -> None:
    """Add the finder once (``kvpress_ext/__init__.py`` calls it)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())  # before the path finder, which would load a second copy
