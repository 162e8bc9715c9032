"""benchmarks/gpu_checks.py: the GPU-only checks are run here on the CPU (``--device cpu``) to show that each
check passes on correct code and fails on a planted bug; the GPU evidence itself is in docs/results/gpu.md."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def gpu_checks(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_checks", REPO / "benchmarks" / "gpu_checks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "DEVICE", "cpu")
    return module


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_every_check_passes_on_correct_code(gpu_checks, arch):
    results = []
    for check in (gpu_checks.check_presses, gpu_checks.check_rerotation, gpu_checks.check_cache_roundtrip,
                  gpu_checks.check_a3):
        check(arch, results)
    assert len(results) == 2 * len(gpu_checks.PRESSES) + 2 + 1 + 1
    assert [r for r in results if not r["ok"]] == []


def test_a_rerotation_that_does_nothing_fails_the_check(gpu_checks, monkeypatch):
    from kvpress_ext.core.adapters.llama import LlamaFamilyAdapter

    monkeypatch.setattr(LlamaFamilyAdapter, "rerotate_keys", lambda self, model, keys, old, new: keys)
    results = []
    gpu_checks.check_rerotation("llama", results)
    assert [r["ok"] for r in results] == [False, False]
    assert min(r["max_abs_diff"] for r in results) > 0.1


def test_a_press_that_changes_logits_at_ratio_zero_fails_the_check(gpu_checks, monkeypatch):
    real = gpu_checks.get_press

    def noisy(name, **kwargs):  # a "no-op" knorm that still drops half the cache
        if name == "knorm" and kwargs.get("compression_ratio") == 0.0:
            kwargs = {"compression_ratio": 0.5}
        return real(name, **kwargs)

    monkeypatch.setattr(gpu_checks, "get_press", noisy)
    results = []
    gpu_checks.check_presses("llama", results)
    bad = [r for r in results if not r["ok"]]
    assert [(r["check"], r["press"]) for r in bad] == [("ratio_zero", "knorm")]


@pytest.mark.slow
def test_without_cuda_one_line_and_exit_2():
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on one
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_checks.py")], check=False, capture_output=True,
                          text=True, cwd=REPO, env=env)
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: gpu_checks needs a CUDA device (this machine has none); run it on a GPU "
                                   "machine.")
