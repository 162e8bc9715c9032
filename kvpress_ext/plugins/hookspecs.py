"""Hook specifications: what a kvpress_ext plugin may provide.

A plugin is a module (or object) with functions marked ``@kvpress_ext.hookimpl`` and named like the
specifications below; third-party packages expose it through the entry-point group ``kvpress_ext``::

    [project.entry-points.kvpress_ext]
    my_plugin = "my_package.plugin"
"""

import pluggy

PROJECT_NAME = "kvpress_ext"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def kvpress_ext_register_presses(register):
    """Register presses: call ``register(name, press_class, defaults=None, requires=None, override=False)`` for each.

    ``defaults`` are the keyword arguments used to build the press for tests and sweeps when none are given. A name
    already registered by another origin is refused (the plugin fails, nothing of it stays) unless ``override=True``.
    """


@hookspec
def kvpress_ext_register_adapters(register):
    """Register model adapters: call ``register(adapter, override=False)`` with a
    :class:`kvpress_ext.core.adapters.ModelAdapter` *instance*; a ``model_type`` another origin drives is refused unless
    ``override=True``."""


@hookspec
def kvpress_ext_register_models(register):
    """Register model short names: call ``register(name, resolve, parameters=..., context=..., source=...,
    licence=..., summary=..., status=None, override=False)``; ``resolve()`` returns a local model directory. Every
    ``--model`` and :func:`kvpress_ext.load_model` then accept ``name``; a name another origin holds is refused
    unless ``override=True``."""
