"""benchmarks/streaming_speed.py times every config in rounds of the shared timing helper: a config without a press
starts every round from its own prompt length (the ceiling stays at its length), a lazy one stays at steady state."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from kvpress_ext.presses.lazy_streaming import LazyStreamingPress
from kvpress_ext.testing import tiny_model

REPO = Path(__file__).resolve().parents[1]


def _module(monkeypatch):
    spec = importlib.util.spec_from_file_location("streaming_speed", REPO / "benchmarks" / "streaming_speed.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_a_press_free_stream_restarts_each_round_and_a_lazy_one_stays_capped(monkeypatch):
    bench, model = _module(monkeypatch), tiny_model("llama")
    with torch.no_grad():
        ceiling = bench.Stream(model, None, 20, vocab=120)
        lazy = bench.Stream(model, LazyStreamingPress(cap_total=24, slack=4), 24, vocab=120)
        for _ in range(3):
            ceiling.round(6)
            assert ceiling.cache.get_seq_length() == 26  # 20 + 6, not 20 + 6 x rounds
            lazy.round(6)
            assert lazy.cache.get_seq_length() <= 24 + 4  # never above cap_total + slack
