"""Plugin-loader behaviours that mutation testing found unchecked (issue #16): what a plugin registers belongs to
it however it registers (at import, through a hook, or later through a ``register`` callable it kept), the
collision rule holds for kept callables too, and failure reasons are complete sentences."""

from __future__ import annotations

import pytest

import kvpress_ext
from kvpress_ext.core.adapters import adapter_registrations
from kvpress_ext.core.adapters.llama import LlamaFamilyAdapter
from kvpress_ext.core.tables import RegistrationConflict
from kvpress_ext.plugins import loader as plugins
from kvpress_ext.runtime.models import available_models


def _with_entry_points(monkeypatch, *entry_points):
    real = plugins._entry_points()
    monkeypatch.setattr(plugins, "_entry_points", lambda: [*entry_points, *real])
    plugins.load_plugins(force=True)


def _restore(monkeypatch):
    monkeypatch.undo()
    plugins.load_plugins(force=True)


class _KeeperEntryPoint:
    """Registers a press while its module is imported, and keeps the ``register`` callables of its hooks."""

    name = "keeper"
    value = "tests.keeper"

    def __init__(self):
        self.kept = {}

    def load(self):
        kvpress_ext.add_press("keeper_import_press", type("ImportPress", (), {}))
        kept = self.kept

        class Plugin:
            @staticmethod
            @kvpress_ext.hookimpl
            def kvpress_ext_register_presses(register):
                kept["press"] = register

            @staticmethod
            @kvpress_ext.hookimpl
            def kvpress_ext_register_adapters(register):
                kept["adapter"] = register

            @staticmethod
            @kvpress_ext.hookimpl
            def kvpress_ext_register_models(register):
                kept["model"] = register

        return Plugin


def test_everything_a_plugin_registers_belongs_to_it(monkeypatch):
    ep = _KeeperEntryPoint()
    _with_entry_points(monkeypatch, ep)
    try:
        assert plugins.failed_plugins() == []
        assert kvpress_ext.press_info("keeper_import_press").source == "keeper"
        # called after loading, outside any plugin's import: still the plugin's
        ep.kept["press"]("keeper_late_press", type("LatePress", (), {}), defaults={"a": 1})
        assert kvpress_ext.press_info("keeper_late_press").source == "keeper"
        ep.kept["adapter"](LlamaFamilyAdapter("keeper_adapter", ("keeper_model_type",)))
        (entry,) = [e for e in adapter_registrations() if e.key == "keeper_model_type"]
        assert entry.origin == "keeper"
        ep.kept["model"]("keeper-model", lambda: "/nowhere", summary="a kept model")
        info = available_models()["keeper-model"]
        assert (info.plugin, info.summary) == ("keeper", "a kept model")
        with pytest.raises(RegistrationConflict, match="model 'stories260k' from plugin 'keeper'"):
            ep.kept["model"]("stories260k", lambda: "/nowhere")
        ep.kept["model"]("stories260k", lambda: "/elsewhere", override=True)
        assert available_models()["stories260k"].plugin == "keeper"
    finally:
        _restore(monkeypatch)
    assert "keeper_late_press" not in kvpress_ext.available_presses()
    assert available_models()["stories260k"].plugin == "kvpress_ext"  # the override went with the plugin


class _SilentFailure:
    name = "silent"
    value = "tests.silent"

    def load(self):
        raise RuntimeError()


class _PropertyPlugin:
    """A plugin instance with an attribute that cannot be read: pluggy skips it, and so must the loader."""

    @property
    def broken(self):
        raise AttributeError("not available")

    @kvpress_ext.hookimpl
    def kvpress_ext_register_presses(self, register):
        register("property_plugin_press", type("PropertyPress", (), {}))


class _PropertyEntryPoint:
    name = "property_plugin"
    value = "tests.property"

    def load(self):
        return _PropertyPlugin()


class _MessyPlugin:
    @staticmethod
    def kvpress_ext_register_presses(register):  # not marked
        pass

    @staticmethod
    def kvpress_ext_register_adapters(register):  # not marked
        pass


class _MessyEntryPoint:
    name = "messy"
    value = "tests.messy"

    def load(self):
        return _MessyPlugin


class _MisspeltPlugin:
    @staticmethod
    @kvpress_ext.hookimpl
    def kvpress_ext_register_pressez(register):
        pass


class _MisspeltEntryPoint:
    name = "misspelt_hook"
    value = "tests.misspelt"

    def load(self):
        return _MisspeltPlugin


def test_failure_reasons_and_unreadable_attributes(monkeypatch):
    _with_entry_points(monkeypatch, _SilentFailure(), _PropertyEntryPoint(), _MessyEntryPoint(), _MisspeltEntryPoint())
    try:
        reasons = {f.name: f.reason for f in plugins.failed_plugins()}
        assert reasons["silent"] == "RuntimeError"  # no message: the exception's name alone
        assert "property_plugin" not in reasons
        assert kvpress_ext.press_info("property_plugin_press").source == "property_plugin"
        assert reasons["messy"] == ("PluginValidationError: kvpress_ext_register_adapters, kvpress_ext_register_presses "
                                    "not marked with @kvpress_ext.hookimpl, so it would never be called")
        assert reasons["misspelt_hook"].endswith(
            "; the hooks are: kvpress_ext_register_adapters, kvpress_ext_register_models, kvpress_ext_register_presses")
    finally:
        _restore(monkeypatch)
