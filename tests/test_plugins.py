"""Plugins: discovery through the entry-point group, isolation of broken plugins, the collision rule, what a
plugin registers belongs to it, and the reasons given for a plugin that failed."""

import importlib.metadata
from pathlib import Path

import pytest
import torch
from transformers import pipeline

import kvpress_ext
from kvpress_ext.core.adapters import adapter_registrations
from kvpress_ext.core.adapters.llama import LlamaFamilyAdapter
from kvpress_ext.core.tables import RegistrationConflict
from kvpress_ext.plugins import loader as plugins
from kvpress_ext.runtime.models import available_models


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


# --- collisions, isolation, misspelt hooks -----------------------------------------------------------------
class _EntryPoint:
    """A stand-in for an installed entry point whose ``load()`` runs ``loader`` (an import that may misbehave)."""

    def __init__(self, name, loader):
        self.name, self.value, self._loader = name, f"tests.{name}", loader

    def load(self):
        return self._loader()


@pytest.fixture
def with_plugins(monkeypatch):
    """Install fake entry points (before the real ones) and reload; afterwards (or at ``.restore()``) the real set
    is reloaded."""
    real = plugins._entry_points()

    def install(*eps):
        monkeypatch.setattr(plugins, "_entry_points", lambda: [*eps, *real])
        plugins.load_plugins(force=True)

    def restore():
        monkeypatch.undo()
        plugins.load_plugins(force=True)

    install.restore = restore  # for a test that checks what the reload takes away
    yield install
    restore()
    assert plugins.failed_plugins() == []


def _plugin(presses=(), adapters=()):
    """A plugin object whose hooks register ``presses`` [(name, cls, kwargs)] and ``adapters`` [(adapter, kwargs)]."""

    class Plugin:
        @staticmethod
        @kvpress_ext.hookimpl
        def kvpress_ext_register_presses(register):
            for name, cls, kwargs in presses:
                register(name, cls, **kwargs)

        @staticmethod
        @kvpress_ext.hookimpl
        def kvpress_ext_register_adapters(register):
            for adapter, kwargs in adapters:
                register(adapter, **kwargs)

    return Plugin


class ImpostorPress(__import__("kvpress").KnormPress):
    """Impostor: a knorm under another press's name."""


def _llama_impostor():
    return LlamaFamilyAdapter("impostor", ("llama", "brand_new_type"))


def _list_output(capsys):
    from kvpress_ext.cli import main

    assert main(["list"]) == 0
    return capsys.readouterr()


def test_taken_press_name_is_refused_and_reported_with_both_origins(with_plugins, capsys):
    from kvpress import SnapKVPress

    with_plugins(_EntryPoint("impostor", lambda: _plugin(presses=[("snapkv", ImpostorPress, {}),
                                                                  ("impostor_only", ImpostorPress, {})])))
    assert kvpress_ext.press_info("snapkv").cls is SnapKVPress  # the built-in is untouched
    assert "impostor_only" not in kvpress_ext.available_presses()  # all or nothing
    [failure] = plugins.failed_plugins()
    assert failure.name == "impostor"
    assert "press 'snapkv' from plugin 'impostor'" in failure.reason and "already registered by built-in" in failure.reason
    assert "SnapKVPress" in failure.reason and "ImpostorPress" in failure.reason and "override=True" in failure.reason
    out = _list_output(capsys)
    assert out.out.count("press 'snapkv' from plugin 'impostor'") == 1  # printed once, in the listing
    assert "impostor" not in out.err  # and not a second time as a log warning


def test_override_true_replaces_and_is_shown_then_undone_on_reload(with_plugins, monkeypatch, capsys):
    from kvpress import SnapKVPress

    from kvpress_ext.cli import main

    with_plugins(_EntryPoint("impostor", lambda: _plugin(presses=[("snapkv", ImpostorPress, {"override": True})])))
    assert plugins.failed_plugins() == []
    info = kvpress_ext.press_info("snapkv")
    assert info.cls is ImpostorPress and info.source == "impostor" and info.override_note == "overrides built-in"
    line = next(x for x in _list_output(capsys).out.splitlines() if x.strip().startswith("snapkv "))
    assert "(from impostor, overrides built-in)" in line
    assert main(["describe", "snapkv"]) == 0
    assert "from plugin impostor, overrides built-in" in capsys.readouterr().out.splitlines()[0]
    monkeypatch.setattr(plugins, "_entry_points", list)  # no plugins at all
    plugins.load_plugins(force=True)
    assert kvpress_ext.press_info("snapkv").cls is SnapKVPress  # the built-in is back


def test_taken_adapter_model_type_is_refused_unless_override(with_plugins, tiny_models, capsys):
    from kvpress_ext.core.adapters import get_adapter

    with_plugins(_EntryPoint("llama_thief", lambda: _plugin(adapters=[(_llama_impostor(), {})])))
    assert get_adapter(tiny_models["llama"]).name == "llama"
    [failure] = plugins.failed_plugins()
    assert "adapter for model_type 'llama' from plugin 'llama_thief'" in failure.reason
    assert "already registered by built-in" in failure.reason
    assert "brand_new_type" not in {e.key for e in kvpress_ext.core.adapters.adapter_registrations()}  # all or nothing

    with_plugins(_EntryPoint("llama_thief", lambda: _plugin(adapters=[(_llama_impostor(), {"override": True})])))
    assert plugins.failed_plugins() == [] and get_adapter(tiny_models["llama"]).name == "impostor"
    out = _list_output(capsys).out
    assert "impostor: model_type in llama, brand_new_type  (from llama_thief, overrides built-in for llama)" in out


def test_plugin_calling_sys_exit_does_not_end_list(with_plugins, capsys):
    def exits():
        raise SystemExit(3)

    with_plugins(_EntryPoint("exits", exits))
    out = _list_output(capsys)  # returns 0 with the full listing
    assert "snapkv" in out.out and "value_norm" in out.out
    assert "exits: it called sys.exit(3) while loading" in out.out


def test_plugin_calling_os_exit_is_a_failure_not_a_silent_exit_0(with_plugins, capsys, monkeypatch):
    """os._exit cannot be caught, so it is replaced while a plugin loads; were the guard missing, the plugin reaches
    this test's stand-in (a failure naming it) rather than ending pytest with status 0."""
    import os
    import threading

    def real_exit(code):
        raise RuntimeError(f"the process's os._exit({code}) was reached")

    monkeypatch.setattr(os, "_exit", real_exit)
    seen = []

    def other_thread_exits():  # another thread (or a forked child) keeps the real os._exit
        def run():
            try:
                os._exit(5)
            except BaseException as exc:  # noqa: BLE001 - recorded for the assertion below
                seen.append(exc)
        t = threading.Thread(target=run)
        t.start()
        t.join()
        return _plugin()

    with_plugins(_EntryPoint("hard_exit", lambda: os._exit(0)), _EntryPoint("threaded", other_thread_exits))
    assert os._exit is real_exit  # put back after loading
    assert [type(e) for e in seen] == [RuntimeError]
    out = _list_output(capsys)
    assert "hard_exit: it called os._exit(0) while loading" in out.out and "value_norm" in out.out
    assert "threaded" not in out.out


def test_a_slow_plugin_is_announced_in_one_line_on_stderr(with_plugins, capsys, monkeypatch):
    import time

    monkeypatch.setattr(plugins, "SLOW_IMPORT_S", 0.05)
    capsys.readouterr()
    with_plugins(_EntryPoint("sleepy", lambda: time.sleep(0.5) or _plugin()), _EntryPoint("quick", _plugin))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "still loading plugin 'sleepy' (tests.sleepy) after 0.05 s" in lines[0], lines
    assert plugins.failed_plugins() == []  # slow is not broken


def test_keyboard_interrupt_is_not_swallowed(monkeypatch):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(plugins, "_entry_points", lambda: [_EntryPoint("interrupted", interrupted)])
    try:
        with pytest.raises(KeyboardInterrupt):
            plugins.load_plugins(force=True)
    finally:
        monkeypatch.undo()
        plugins.load_plugins(force=True)
    assert plugins.failed_plugins() == []


def test_misspelt_and_unmarked_hooks_are_reported(with_plugins):
    import types

    def kvpress_ext_register_press(register):  # the spec is kvpress_ext_register_presses
        register("misspelt_press", ImpostorPress)

    def kvpress_ext_register_presses(register):  # right name, no @hookimpl
        register("unmarked_press", ImpostorPress)

    misspelt = types.SimpleNamespace(kvpress_ext_register_press=kvpress_ext.hookimpl(kvpress_ext_register_press))
    unmarked = types.SimpleNamespace(kvpress_ext_register_presses=kvpress_ext_register_presses)
    with_plugins(_EntryPoint("misspelt", lambda: misspelt), _EntryPoint("unmarked", lambda: unmarked))
    reasons = {f.name: f.reason for f in plugins.failed_plugins()}
    assert "unknown hook 'kvpress_ext_register_press'" in reasons["misspelt"]
    assert "kvpress_ext_register_presses" in reasons["misspelt"]  # names the right one
    assert "not marked with @kvpress_ext.hookimpl" in reasons["unmarked"]
    assert "misspelt_press" not in kvpress_ext.available_presses()
    assert plugins.get_plugin_manager().get_plugin("misspelt") is None
    assert "value_norm" in kvpress_ext.available_presses()  # the real plugin still loads


def test_direct_registration_follows_the_same_rule():
    with pytest.raises(RegistrationConflict, match="already registered by built-in"):
        kvpress_ext.add_press("knorm", ImpostorPress)
    with pytest.raises(RegistrationConflict, match="model_type 'llama'"):
        kvpress_ext.add_adapter(_llama_impostor())
    with pytest.raises(TypeError, match="instance"):
        kvpress_ext.add_adapter(LlamaFamilyAdapter)
    assert kvpress_ext.press_info("knorm").cls.__name__ == "KnormPress"


def _imports(module_path):
    """Every kvpress_ext module a file imports, at module level or inside functions."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(module_path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kvpress_ext"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("kvpress_ext"))
    return found


def test_registries_do_not_import_the_plugin_loader_and_it_uses_public_functions():
    pkg = Path(kvpress_ext.__file__).parent
    for registry_file in ("core/registry.py", "core/adapters/__init__.py", "core/tables.py", "runtime/models.py"):
        assert not any("plugins" in m for m in _imports(pkg / registry_file)), registry_file
    assert "registry" not in str(_imports(pkg / "core/tables.py"))
    import ast

    # names and attributes the loader's code uses (not its strings: mutation testing rewrites those)
    tree = ast.parse((pkg / "plugins" / "loader.py").read_text())
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    used |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    used |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    for private in ("_REGISTRY", "_ADAPTERS", "_PRESSES", "_MODEL_TYPES", "_entries"):
        assert private not in used, private


@pytest.mark.slow
def test_installed_entry_points_end_to_end(tmp_path):
    """Real entry points in a real process: plugins calling sys.exit(3) or os._exit(0) and one registering "snapkv" do not end
    `kvpress-ext list`, which prints each failure once (stdout) and no warning besides (stderr)."""
    import os
    import subprocess
    import sys

    dist = tmp_path / "fake_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[kvpress_ext]\nexits = exits_plugin\nimpostor = impostor_plugin\n"
                                           "hard_exit = hard_exit_plugin\n")
    (tmp_path / "exits_plugin.py").write_text("import sys\nsys.exit(3)\n")
    (tmp_path / "hard_exit_plugin.py").write_text("import os\nos._exit(0)\n")
    (tmp_path / "impostor_plugin.py").write_text(
        "from kvpress import KnormPress\nimport kvpress_ext\n\nclass ImpostorPress(KnormPress):\n    pass\n\n"
        "@kvpress_ext.hookimpl\ndef kvpress_ext_register_presses(register):\n    register('snapkv', ImpostorPress)\n"
    )
    repo = Path(kvpress_ext.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), str(tmp_path)])}
    code = "import sys; from kvpress_ext.cli import main; sys.exit(main(sys.argv[1:]))"
    run = subprocess.run([sys.executable, "-c", code, "list"], capture_output=True, text=True, env=env, timeout=300,
                         check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("exits: it called sys.exit(3) while loading") == 1
    assert run.stdout.count("hard_exit: it called os._exit(0) while loading") == 1
    assert run.stdout.count("press 'snapkv' from plugin 'impostor'") == 1
    assert "already registered by built-in (kvpress.presses.snapkv_press.SnapKVPress)" in run.stdout
    assert run.stderr.strip() == ""
    line = next(x for x in run.stdout.splitlines() if x.strip().startswith("snapkv "))
    assert "from impostor" not in line  # the built-in is still the one listed
# --- loading from a fresh process state (as on first use), once, re-entrantly --------------------------------
@pytest.fixture
def fresh_plugin_state(monkeypatch):
    """Plugin manager, registries and load flags as in a new process; everything is restored afterwards.
    (Our own presses register on import, which is cached: only hook-registered entries come back.)"""
    from kvpress_ext.core import tables as registration

    state = registration.snapshot_all()
    monkeypatch.setattr(plugins, "_manager", None)
    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(plugins, "_loading", False)
    monkeypatch.setattr(plugins, "_failures", [])
    monkeypatch.setattr(plugins, "_loaded_names", [])
    for table, _ in state:
        table.restore({})
    try:
        yield monkeypatch
    finally:
        monkeypatch.undo()
        registration.restore_all(state)


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
    from kvpress_ext.plugins import builtin as builtin_plugin

    presses = kvpress_ext.available_presses()
    assert presses["knorm"].source == "kvpress_ext" and presses["snapkv"].source == "kvpress_ext"
    assert presses["value_norm"].source == "example"  # found through the real entry-point group
    assert presses["value_norm"].defaults == {"compression_ratio": 0.5}
    assert {a.name for a in kvpress_ext.available_adapters()} == {"llama", "mistral", "qwen2", "qwen3", "gpt_neox", "gemma3"}
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
    with caplog.at_level("WARNING", logger="kvpress_ext.plugins.loader"):
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


# --- what a plugin registers belongs to it, however it registers; whole failure reasons --------------------
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


def test_everything_a_plugin_registers_belongs_to_it(with_plugins):
    ep = _KeeperEntryPoint()
    with_plugins(ep)
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
        with_plugins.restore()
    assert "keeper_late_press" not in kvpress_ext.available_presses()
    assert available_models()["stories260k"].plugin == "kvpress_ext"  # the override went with the plugin


def _raise_bare_runtime_error():
    raise RuntimeError()


class _PropertyPlugin:
    """A plugin instance with an attribute that cannot be read: pluggy skips it, and so must the loader."""

    @property
    def broken(self):
        raise AttributeError("not available")

    @kvpress_ext.hookimpl
    def kvpress_ext_register_presses(self, register):
        register("property_plugin_press", type("PropertyPress", (), {}))


class _MessyPlugin:
    @staticmethod
    def kvpress_ext_register_presses(register):  # not marked
        pass

    @staticmethod
    def kvpress_ext_register_adapters(register):  # not marked
        pass


class _MisspeltPlugin:
    @staticmethod
    @kvpress_ext.hookimpl
    def kvpress_ext_register_pressez(register):
        pass


def test_failure_reasons_are_whole_and_unreadable_attributes_are_skipped(with_plugins):
    with_plugins(_EntryPoint("silent", _raise_bare_runtime_error), _EntryPoint("property_plugin", _PropertyPlugin),
                 _EntryPoint("messy", lambda: _MessyPlugin), _EntryPoint("misspelt_hook", lambda: _MisspeltPlugin))
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
        with_plugins.restore()
