"""The decode-throughput comparison goes through the shared timing helper: every config decodes the same blocks in
rounds, and each record carries the ratio's spread, threads, load before/after and the reliable flag."""

from __future__ import annotations

import pytest
import torch

from kvpress_ext.evaluation import timing
from kvpress_ext.evaluation.throughput import run_interleaved
from kvpress_ext.testing import tiny_model

CONFIGS = ["full", "rkv@16", "lazy_streaming@16"]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _run(model, window=10, block=4):
    text = torch.randint(3, 120, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        return run_interleaved(model, text, CONFIGS, position=24, batch=2, window=window, block=block, interval=4)


def test_every_config_decodes_the_window_in_rounds_of_the_block(model):
    records = _run(model)
    assert [r["tokens"] for r in records] == [10, 10, 10]  # blocks of 4, 4, 2
    for r in records[1:]:
        t = r["timing"]
        assert t["rounds"] == 3 and t["threads"] == torch.get_num_threads()
        assert t["reliable"] is (t["reasons"] == [])
        assert t["speedup"] == pytest.approx(1 / t["ratio"], rel=1e-9)  # odd rounds: median commutes with 1/x
    assert records[0]["timing"]["reference"] is True and records[0]["x_full"] == 1.0


def test_a_load_jump_marks_every_record_unreliable(model, monkeypatch):
    loads = iter([0.0, 0.1, 0.2, 5.0])
    monkeypatch.setattr(timing, "machine_load",
                        lambda: {"loadavg_1m": next(loads), "loadavg_5m": 0.0, "cpu_count": 2, "busy": False})
    records = _run(model)
    for r in records:
        assert r["timing"]["reliable"] is False
        assert "load average moved by 5.00 (> 1.00 on 2 CPUs)" in r["timing"]["reasons"]
        assert r["timing"]["load_start"]["loadavg_1m"] == 0.0 and r["timing"]["load_end"]["loadavg_1m"] == 5.0


def test_profile_records_each_configs_operators_after_timing(model):
    text = torch.randint(3, 120, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        records = run_interleaved(model, text, CONFIGS, position=24, batch=2, window=4, block=4, interval=4, profile=5)
    for r in records:
        assert 1 <= len(r["profile"]) <= 5 and r["tokens"] == 4  # the profiled steps are not counted as timed
        assert all(o["self_s"] >= 0 and 0 <= o["share"] <= 1 for o in r["profile"])
    assert "profile" not in _run(model)[0]
