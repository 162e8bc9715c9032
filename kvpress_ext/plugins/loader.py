"""Plugin discovery with pluggy: built-in presses, adapters and model names, then third-party entry points.

Each entry point is loaded on its own, and is all or nothing. It fails, is recorded in :func:`failed_plugins`
(name and reason) and leaves nothing registered when

* its import raises anything, ``sys.exit()`` included (only ``KeyboardInterrupt`` propagates), or calls
  ``os._exit()``: while a plugin loads, ``os._exit`` raises :class:`ExitCalled` instead of ending the process
  (``kvpress-ext list`` would exit 0 having printed nothing). Only the loading thread of this process is guarded;
  a plugin that ends the process some other way (a signal, C ``exit`` through ctypes) cannot be stopped in-process;
* it has a hook implementation pluggy does not know (a misspelt hook name, reported by ``check_pending``) or a
  function named like a hook but not marked ``@kvpress_ext.hookimpl``;
* a hook raises, or registers a press name, adapter model type or model short name that another origin holds without
  ``override=True`` (the reason names both origins; see :mod:`kvpress_ext.core.tables`).

Plugins register only through the public functions :func:`kvpress_ext.core.registry.add_press` and
:func:`kvpress_ext.core.adapters.add_adapter` and :func:`kvpress_ext.runtime.models.register_model`; rolling a failed plugin back uses the registration tables' own
snapshots. Loading happens once, lazily, the first time a registry is read (the registries reach this module
through :func:`kvpress_ext.core.tables.ensure_loaded`, so nothing imports in a cycle). Each failure is logged
once as a warning; ``kvpress-ext list`` shows the failures in its output instead. A plugin still loading after
:data:`SLOW_IMPORT_S` seconds is announced by one line on stderr, so a command never stalls without a word.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import sys
import threading
from dataclasses import dataclass

import pluggy

from kvpress_ext.core import tables
from kvpress_ext.core.adapters import add_adapter
from kvpress_ext.core.registry import add_press
from kvpress_ext.plugins import builtin as builtin_plugin
from kvpress_ext.plugins import hookspecs
from kvpress_ext.runtime.models import register_model as add_model

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "kvpress_ext"
BUILTIN_NAME = "kvpress_ext.builtin"
#: Seconds a plugin may take to load before one line on stderr names it (the command is waiting for it).
SLOW_IMPORT_S = 2.0


class ExitCalled(SystemExit):
    """What ``os._exit(code)`` raises while a plugin loads: the call would end the process at once, past every
    handler, so the loader turns it into a failure of that plugin like ``sys.exit``."""


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be loaded, and why."""

    name: str
    reason: str


_manager: pluggy.PluginManager | None = None
_failures: list[PluginFailure] = []
_loaded_names: list[str] = []
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


def _hook_registrars(origin: str) -> dict:
    """The ``register`` callables handed to each hook, bound to the plugin's origin."""

    def register_press(name, cls, defaults=None, requires=None, override=False):
        add_press(name, cls, source=origin, defaults=defaults, requires=requires, override=override)

    def register_adapter(adapter, override=False):
        add_adapter(adapter, source=origin, override=override)

    def register_model(name, resolve, override=False, **info):
        add_model(name, resolve, plugin=origin, override=override, **info)

    return {"kvpress_ext_register_presses": register_press, "kvpress_ext_register_adapters": register_adapter,
            "kvpress_ext_register_models": register_model}


def _call_hooks(plugin, origin: str) -> None:
    """Call one plugin's hook implementations (and only its) against the registries."""
    pm = get_plugin_manager()
    others = [p for p in pm.get_plugins() if p is not plugin]
    for hook_name, register in _hook_registrars(origin).items():
        pm.subset_hook_caller(hook_name, remove_plugins=others)(register=register)


def _unmarked_hooks(plugin) -> list[str]:
    """Functions named ``kvpress_ext_...`` that pluggy will not call because they lack ``@kvpress_ext.hookimpl``."""
    marker = f"{hookspecs.PROJECT_NAME}_impl"
    names = []
    for attr in dir(plugin):
        value = getattr(plugin, attr, None)
        if attr.startswith("kvpress_ext_") and callable(value) and not hasattr(value, marker):
            names.append(attr)
    return names


def _describe_exception(exc: BaseException) -> str:
    if isinstance(exc, ExitCalled):
        return f"it called os._exit({exc.code!r}) while loading"
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r}) while loading"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _announce_slow(ep) -> None:
    print(f"kvpress-ext: still loading plugin {ep.name!r} ({ep.value}) after {SLOW_IMPORT_S:g} s; if it hangs, "
          "uninstall the package that provides it", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _watched(ep):
    """Around one plugin's loading: ``os._exit`` from this thread raises :class:`ExitCalled` (a forked child or
    another thread still exits for real), and a load slower than :data:`SLOW_IMPORT_S` is announced once."""
    pid, thread = os.getpid(), threading.get_ident()
    modules = [m for m in (os, sys.modules.get(os.name)) if m is not None]  # os._exit is posix._exit / nt._exit
    real = os._exit

    def guarded(code):
        if os.getpid() != pid or threading.get_ident() != thread:
            real(code)
        raise ExitCalled(code)

    timer = threading.Timer(SLOW_IMPORT_S, _announce_slow, (ep,))
    timer.daemon = True
    saved = [m._exit for m in modules]
    for m in modules:
        m._exit = guarded
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        for m, f in zip(modules, saved):
            m._exit = f


def _load_entry_point(pm: pluggy.PluginManager, ep) -> None:
    """Import, validate and call one plugin under its own origin; raise on any problem."""
    with _watched(ep), tables.registering_as(ep.name):
        plugin = ep.load()
        if pm.get_plugin(ep.name) is None:
            pm.register(plugin, name=ep.name)  # validates hook names' arguments
        plugin = pm.get_plugin(ep.name)
        try:
            pm.check_pending()  # hook implementations with no specification: a misspelt hook name
        except pluggy.PluginValidationError as exc:
            known = ", ".join(sorted(n for n in dir(hookspecs) if n.startswith("kvpress_ext_")))
            raise pluggy.PluginValidationError(plugin, f"{exc}; the hooks are: {known}") from None
        unmarked = _unmarked_hooks(plugin)
        if unmarked:
            raise pluggy.PluginValidationError(
                plugin, f"{', '.join(unmarked)} not marked with @kvpress_ext.hookimpl, so it would never be called"
            )
        _call_hooks(plugin, ep.name)


def load_plugins(force: bool = False) -> None:
    """Register built-ins and every entry point of the group ``kvpress_ext`` (once per process).

    ``force`` drops what previously loaded plugins registered (bringing back what they overrode) and loads the
    entry points again.
    """
    global _loaded, _loading
    if (_loaded and not force) or _loading:
        return
    _loading = True
    try:
        pm = get_plugin_manager()

        if not pm.is_registered(builtin_plugin):
            pm.register(builtin_plugin, name=BUILTIN_NAME)
            with tables.registering_as(tables.BUILTIN):
                _call_hooks(builtin_plugin, tables.BUILTIN)
        for name in _loaded_names:
            tables.remove_origin_everywhere(name)
            if pm.get_plugin(name) is not None:
                pm.unregister(name=name)
        _loaded_names.clear()
        _failures.clear()
        for ep in _entry_points():
            before = tables.snapshot_all()
            try:
                _load_entry_point(pm, ep)
                _loaded_names.append(ep.name)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 - isolation is the point (sys.exit included)
                tables.restore_all(before)
                if pm.get_plugin(ep.name) is not None:
                    pm.unregister(name=ep.name)
                failure = PluginFailure(ep.name, _describe_exception(exc))
                _failures.append(failure)
                logger.warning("kvpress_ext plugin %r failed to load and was skipped: %s", ep.name, failure.reason)
        _loaded = True
    finally:
        _loading = False


def _entry_points():
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


tables.set_loader(load_plugins)
