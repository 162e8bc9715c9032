"""benchmarks/a3_ttft.py --profile: one call of a side under torch's profiler, its operators by self CPU time, the
heaviest first, with their share of the call (what a missed speed target is explained with)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("a3_ttft", REPO / "benchmarks" / "a3_ttft.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_profile_names_the_heaviest_operator_first_with_its_share(monkeypatch):
    bench = _bench(monkeypatch)
    a, small = torch.randn(400, 400), torch.randn(8)

    def work():
        for _ in range(5):
            a @ a  # about 5 x 128 M flops: dominates
        small.sin()

    ops = bench.profile_call(work, top=3)
    assert len(ops) <= 3
    assert ops[0]["op"] in ("aten::mm", "aten::matmul") and ops[0]["calls"] == 5
    assert [o["self_s"] for o in ops] == sorted((o["self_s"] for o in ops), reverse=True)
    assert 0.5 < ops[0]["share"] <= 1.0 and sum(o["share"] for o in ops) <= 1.0 + 1e-9
