"""Plugins: discovery through the entry-point group, isolation of broken plugins."""

import importlib.metadata

import pytest
import torch
from transformers import pipeline

import kvpress_ext
from kvpress_ext import plugins


def test_example_plugin_is_discovered_through_its_entry_point(tiny_models, tokenizer):
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="kvpress_ext")}
    assert eps.get("example") == "kvpress_ext_example.plugin", (
        "the example plugin is not installed: run `pip install examples/plugin_example` (as .ci/run does)"
    )
    info = kvpress_ext.press_info("value_norm")
    assert info.source == "example"
    press = kvpress_ext.get_press("value_norm", compression_ratio=0.5)
    pipe = pipeline("kv-press-text-generation", model=tiny_models["llama"], tokenizer=tokenizer, device="cpu")
    assert isinstance(pipe("abcdefghij" * 4, question="x", press=press, max_new_tokens=3)["answer"], str)
    # The press really compressed: the cache after prefill holds half the context.
    cache = __import__("transformers").DynamicCache()
    ids = torch.randint(3, 100, (1, 40))
    with kvpress_ext.apply_press(press, tiny_models["gpt_neox"]):
        tiny_models["gpt_neox"].gpt_neox(input_ids=ids, past_key_values=cache)
    assert cache.get_seq_length() == 20


class _BrokenEntryPoint:
    name = "broken_plugin"
    value = "does_not_exist.module"

    def load(self):
        raise ImportError("No module named 'does_not_exist'")


def test_broken_plugin_is_reported_and_the_rest_still_loads(monkeypatch):
    real = plugins._entry_points()
    monkeypatch.setattr(plugins, "_entry_points", lambda: [_BrokenEntryPoint(), *real])
    plugins.load_plugins(force=True)
    try:
        failures = plugins.failed_plugins()
        assert [f.name for f in failures] == ["broken_plugin"]
        assert "does_not_exist" in failures[0].reason
        assert "knorm" in kvpress_ext.available_presses()
        assert "value_norm" in kvpress_ext.available_presses()
    finally:
        monkeypatch.undo()
        plugins.load_plugins(force=True)
    assert plugins.failed_plugins() == []


class _HalfWayPlugin:
    """Registers one press, then its hook raises: nothing of it may stay behind."""

    @staticmethod
    @kvpress_ext.hookimpl
    def kvpress_ext_register_presses(register):
        register("half_way_press", type("HalfWayPress", (), {}))
        raise RuntimeError("plugin bug after the first registration")


class _HalfWayEntryPoint:
    name = "half_way_plugin"
    value = "tests.half_way"

    def load(self):
        return _HalfWayPlugin


def test_plugin_whose_hook_raises_is_rolled_back_and_unregistered(monkeypatch):
    real = plugins._entry_points()
    monkeypatch.setattr(plugins, "_entry_points", lambda: [_HalfWayEntryPoint(), *real])
    plugins.load_plugins(force=True)
    try:
        assert [f.name for f in plugins.failed_plugins()] == ["half_way_plugin"]
        assert "plugin bug" in plugins.failed_plugins()[0].reason
        assert "half_way_press" not in kvpress_ext.available_presses()
        assert plugins.get_plugin_manager().get_plugin("half_way_plugin") is None
        assert "value_norm" in kvpress_ext.available_presses()  # the plugin after it still loaded
    finally:
        monkeypatch.undo()
        plugins.load_plugins(force=True)
    assert plugins.failed_plugins() == []


def test_hook_specifications_are_pluggy_hooks():
    pm = plugins.get_plugin_manager()
    assert hasattr(pm.hook, "kvpress_ext_register_presses")
    assert hasattr(pm.hook, "kvpress_ext_register_adapters")
    import types

    import pluggy

    def kvpress_ext_register_presses(wrong_arg):
        pass

    bad = types.SimpleNamespace(kvpress_ext_register_presses=kvpress_ext.hookimpl(kvpress_ext_register_presses))
    with pytest.raises(pluggy.PluginValidationError, match="wrong_arg"):
        pm.register(bad, name="bad_plugin")


# --- loading from a fresh process state (as on first use), once, re-entrantly --------------------------------
@pytest.fixture
def fresh_plugin_state(monkeypatch):
    """Plugin manager, registries and load flags as in a new process; everything is restored afterwards.
    (Our own presses register on import, which is cached: only hook-registered entries come back.)"""
    from kvpress_ext import adapters, registry

    monkeypatch.setattr(plugins, "_manager", None)
    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(plugins, "_loading", False)
    monkeypatch.setattr(plugins, "_failures", [])
    monkeypatch.setattr(registry, "_REGISTRY", {})
    monkeypatch.setattr(adapters, "_ADAPTERS", [])
    yield monkeypatch


class _CountingEntryPoint:
    """A plugin registering one press with defaults and a requirement; counts how often it is loaded."""

    name = "counting_plugin"
    value = "tests.counting"

    def __init__(self, read_registry=False):
        self.loads = 0
        self.read_registry = read_registry

    def load(self):
        self.loads += 1
        outer = self

        class Plugin:
            @staticmethod
            @kvpress_ext.hookimpl
            def kvpress_ext_register_presses(register):
                if outer.read_registry:  # a plugin that looks at the registry while it is being filled
                    assert "knorm" in kvpress_ext.available_presses()
                register("counted_press", type("CountedPress", (), {}), defaults={"x": 1}, requires="a GPU")

        return Plugin


def test_first_use_registers_builtins_and_entry_point_plugins(fresh_plugin_state):
    from kvpress_ext import builtin_plugin

    presses = kvpress_ext.available_presses()
    assert presses["knorm"].source == "kvpress_ext" and presses["snapkv"].source == "kvpress_ext"
    assert presses["value_norm"].source == "example"  # found through the real entry-point group
    assert presses["value_norm"].defaults == {"compression_ratio": 0.5}
    assert {a.name for a in kvpress_ext.available_adapters()} == {"llama", "mistral", "qwen2", "qwen3", "gpt_neox"}
    pm = plugins.get_plugin_manager()
    assert pm is plugins.get_plugin_manager() and pm.project_name == "kvpress_ext"
    assert pm.get_plugin("kvpress_ext.builtin") is builtin_plugin
    assert plugins.failed_plugins() == []


def test_plugins_load_once_unless_forced(fresh_plugin_state):
    ep = _CountingEntryPoint()
    fresh_plugin_state.setattr(plugins, "_entry_points", lambda: [ep])
    info = kvpress_ext.press_info("counted_press")
    assert (info.source, info.defaults, info.requires) == ("counting_plugin", {"x": 1}, "a GPU")
    kvpress_ext.available_presses()
    kvpress_ext.get_press("knorm", compression_ratio=0.5)
    assert ep.loads == 1
    plugins.load_plugins(force=True)
    assert ep.loads == 2 and "counted_press" in kvpress_ext.available_presses()


def test_a_plugin_may_read_the_registry_while_loading(fresh_plugin_state):
    """Registry reads during loading see what is registered so far instead of starting a second load."""
    ep = _CountingEntryPoint(read_registry=True)
    fresh_plugin_state.setattr(plugins, "_entry_points", lambda: [ep])
    assert "counted_press" in kvpress_ext.available_presses()
    assert plugins.failed_plugins() == [] and ep.loads == 1


def test_failed_plugin_reason_and_log_line(monkeypatch, caplog):
    real = plugins._entry_points()
    monkeypatch.setattr(plugins, "_entry_points", lambda: [_BrokenEntryPoint(), *real])
    with caplog.at_level("WARNING", logger="kvpress_ext.plugins"):
        plugins.load_plugins(force=True)
    try:
        reason = "ImportError: No module named 'does_not_exist'"
        assert plugins.failed_plugins() == [plugins.PluginFailure("broken_plugin", reason)]
        assert [r.getMessage() for r in caplog.records] == [
            f"kvpress_ext plugin 'broken_plugin' failed to load and was skipped: {reason}"
        ]
    finally:
        monkeypatch.undo()
        plugins.load_plugins(force=True)
