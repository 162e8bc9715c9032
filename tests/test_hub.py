"""Offline detection (kvpress_ext/runtime/hub.py): HF_HUB_OFFLINE honoured, one quick connect otherwise, a hub model id or
a press needing hub files fails at once with one line naming the fix. The online path is mocked (no network)."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
from conftest import shared_path

from kvpress_ext.cli import main
from kvpress_ext.runtime import hub

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh(monkeypatch):
    """A fresh decision (the reason is cached per process) and huggingface_hub's offline flag restored afterwards."""
    flag = huggingface_hub.constants.HF_HUB_OFFLINE
    hub.offline_reason.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    huggingface_hub.constants.HF_HUB_OFFLINE = flag
    hub.offline_reason.cache_clear()


def _network(monkeypatch, ok: bool, calls: list):
    def connect(address, timeout=None):
        calls.append((address, timeout))
        if not ok:
            raise socket.gaierror(-2, "Name or service not known")
        return socket.socket()  # closed by the caller; never connected

    monkeypatch.setattr(hub.socket, "create_connection", connect)


def test_environment_variable_is_honoured_without_touching_the_network(fresh):
    calls = []
    _network(fresh, ok=True, calls=calls)
    fresh.setenv("HF_HUB_OFFLINE", "1")
    assert hub.offline_reason() == "HF_HUB_OFFLINE=1 is set" and not hub.hub_reachable()
    assert calls == []


def test_one_quick_connect_decides_and_is_remembered(fresh):
    calls = []
    _network(fresh, ok=False, calls=calls)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        fresh.delenv(var, raising=False)
    fresh.setenv("HF_ENDPOINT", "https://hub.example.org")
    reason = hub.offline_reason()
    assert reason == "hub.example.org:443 cannot be reached (Name or service not known)"
    hub.offline_reason()
    assert calls == [(("hub.example.org", 443), hub.CONNECT_TIMEOUT_S)]  # once per process, with a short timeout
    assert hub.CONNECT_TIMEOUT_S <= 2


def test_online_path_changes_nothing(fresh):
    calls = []
    _network(fresh, ok=True, calls=calls)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        fresh.delenv(var, raising=False)
    huggingface_hub.constants.HF_HUB_OFFLINE = False
    assert hub.use_cache_only_if_offline() is None and hub.hub_reachable()
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # online: huggingface_hub left as it was
    hub.check_model_source("org/some-model", "org/some-model", "a local directory")  # online: from_pretrained decides
    assert len(calls) == 1


def test_offline_switches_huggingface_hub_to_cache_only(fresh):
    calls = []
    _network(fresh, ok=False, calls=calls)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        fresh.delenv(var, raising=False)
    huggingface_hub.constants.HF_HUB_OFFLINE = False
    assert "cannot be reached" in hub.use_cache_only_if_offline()
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True
    fresh.setattr(hub, "is_cached", lambda repo, filename="config.json": True)
    hub.check_model_source("org/cached-model", "org/cached-model", "x")  # cached: loads from the cache, no error
    fresh.setattr(hub, "is_cached", lambda repo, filename="config.json": False)
    with pytest.raises(hub.HubUnavailableError, match="hf download org/missing"):
        hub.check_model_source("org/missing", "org/missing", "a local model directory")


@pytest.mark.parametrize("env_offline", [True, False])
def test_hub_model_id_offline_fails_in_under_5_s_with_one_line(fresh, capsys, env_offline):
    calls = []
    _network(fresh, ok=False, calls=calls)
    if not env_offline:  # no variable: the quick connect finds the hub unreachable
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            fresh.delenv(var, raising=False)
    t0 = time.perf_counter()
    rc = main(["generate", "--model", "some-org/not-cached-model", "--prompt", "Once upon a time"])
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "some-org/not-cached-model" in err[0] and "not in the local cache" in err[0]
    assert "local model directory" in err[0] and "hf download some-org/not-cached-model" in err[0]
    assert ("HF_HUB_OFFLINE=1 is set" if env_offline else "huggingface.co:443 cannot be reached") in err[0]
    assert elapsed < 5, elapsed


def test_quickstart_with_a_hub_id_offline_gives_the_line(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("quickstart", REPO / "examples" / "quickstart.py")
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    assert quickstart.main(["--model", "some-org/not-cached-model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "quickstart.py: error: Cannot load model 'some-org/not-cached-model'" in err[0], err
    assert "Traceback" not in "".join(err)


@pytest.mark.parametrize("press", ["qfilter", "expected_attention_stats"])
def test_press_needing_hub_files_offline_is_one_line(capsys, press):
    model = str(shared_path("models", "stories260k"))
    t0 = time.perf_counter()
    rc = main(["generate", "--model", model, "--prompt", "Once upon a time there was a girl named Lily who liked",
               "--press", press, "--max_new_tokens", "2", "--no_progress"])
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert f"Press '{press}' cannot run here" in err[0] and "HF_HUB_OFFLINE=1 is set" in err[0]
    assert "choose another press" in err[0] and "kvpress-ext list" in err[0]
    assert elapsed < 5, elapsed


def test_press_failure_without_hub_cause_does_not_blame_the_network():
    try:
        with hub.explain_press_failures("duo_attention"):
            raise AssertionError("Checkpoint x not in ['a', 'b']")
    except hub.PressUnavailableError as exc:
        message = str(exc)
    assert "needs attention patterns of a supported checkpoint" in message
    assert "cannot be used" not in message and "AssertionError: Checkpoint x" in message
    with pytest.raises(ZeroDivisionError), hub.explain_press_failures("knorm"):  # no requirement: untouched
        raise ZeroDivisionError


def test_test_suite_runs_offline():
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert "huggingface_hub" in sys.modules and huggingface_hub.constants.HF_HUB_OFFLINE is True
