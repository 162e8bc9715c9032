"""Plugin discovery with pluggy: built-in presses, adapters and model names, then third-party entry points.

Each entry point is loaded on its own: one that fails to import or whose hook raises is recorded in
:func:`failed_plugins` (with its name and reason) and logged, and every other plugin still loads. A
plugin is all or nothing: if its hook raises half-way, the presses, adapters and models it registered before
the error are removed again and it is unregistered from the plugin manager.
Loading happens once, lazily, the first time a registry is read.
"""

from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass

import pluggy

from kvpress_ext import hookspecs

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "kvpress_ext"


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be loaded, and why."""

    name: str
    reason: str


_manager: pluggy.PluginManager | None = None
_failures: list[PluginFailure] = []
_loaded = False
_loading = False


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager for the project name ``kvpress_ext``."""
    global _manager
    if _manager is None:
        _manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        _manager.add_hookspecs(hookspecs)
    return _manager


def failed_plugins() -> list[PluginFailure]:
    """Plugins that failed to load in this process, with their reasons."""
    load_plugins()
    return list(_failures)


def _register_from(plugin, plugin_name: str) -> None:
    """Call one plugin's hook implementations (and only its) against the registries."""
    from kvpress_ext.adapters import add_adapter
    from kvpress_ext.models import register_model
    from kvpress_ext.registry import add_press

    def register_press(name, cls, defaults=None, requires=None):
        add_press(name, cls, source=plugin_name, defaults=defaults, requires=requires)

    def register_model_from_plugin(name, resolve, **info):
        register_model(name, resolve, **{**info, "plugin": plugin_name})

    pm = get_plugin_manager()
    others = [p for p in pm.get_plugins() if p is not plugin]
    pm.subset_hook_caller("kvpress_ext_register_presses", remove_plugins=others)(register=register_press)
    pm.subset_hook_caller("kvpress_ext_register_adapters", remove_plugins=others)(register=add_adapter)
    pm.subset_hook_caller("kvpress_ext_register_models", remove_plugins=others)(register=register_model_from_plugin)


def _registry_state():
    """Copies of the press, adapter and model registries, to undo a plugin that fails half-way."""
    from kvpress_ext import adapters, models, registry

    return dict(registry._REGISTRY), list(adapters._ADAPTERS), dict(models._MODELS)


def _restore_registry_state(state) -> None:
    from kvpress_ext import adapters, models, registry

    presses, adapter_list, model_table = state
    registry._REGISTRY.clear()
    registry._REGISTRY.update(presses)
    adapters._ADAPTERS[:] = adapter_list
    models._MODELS.clear()
    models._MODELS.update(model_table)


def load_plugins(force: bool = False) -> None:
    """Register built-ins and every entry point of the group ``kvpress_ext`` (once per process)."""
    global _loaded, _loading
    if (_loaded and not force) or _loading:
        return
    _loading = True
    try:
        pm = get_plugin_manager()
        from kvpress_ext import builtin_plugin

        if not pm.is_registered(builtin_plugin):
            pm.register(builtin_plugin, name="kvpress_ext.builtin")
        _register_from(builtin_plugin, "kvpress_ext")
        _failures.clear()
        for ep in _entry_points():
            before = _registry_state()
            try:
                plugin = ep.load()
                if pm.get_plugin(ep.name) is None:
                    pm.register(plugin, name=ep.name)  # validates hook names and signatures
                _register_from(pm.get_plugin(ep.name), ep.name)
            except Exception as exc:  # noqa: BLE001 - isolation is the point
                _restore_registry_state(before)
                if pm.get_plugin(ep.name) is not None:
                    pm.unregister(name=ep.name)
                failure = PluginFailure(ep.name, f"{type(exc).__name__}: {exc}")
                _failures.append(failure)
                logger.warning("kvpress_ext plugin %r failed to load and was skipped: %s", ep.name, failure.reason)
        _loaded = True
    finally:
        _loading = False


def _entry_points():
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
