"""Chunked prefill bounds the cache: at most the kept tokens plus one chunk per layer, and the throughput benchmark
refuses configs it cannot run in one line (exit 2)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvpress_ext import get_press
from kvpress_ext.evaluation.prefill_memory import measure_prefill

REPO = Path(__file__).resolve().parents[1]


def test_chunked_prefill_holds_at_most_the_budget_plus_one_chunk(tiny_models):
    model = tiny_models["llama"]
    ids = torch.randint(4, 128, (1, 64), generator=torch.Generator().manual_seed(0))
    one = measure_prefill(model, ids, get_press("knorm", compression_ratio=0.75))
    chunked = measure_prefill(model, ids, get_press("knorm", compression_ratio=0.75), chunk=16)
    per_token = one["final_kv_bytes"] // (2 * one["final_cache_length"])  # two layers
    assert chunked["final_cache_length"] == one["final_cache_length"] == 16  # (1 - 0.75) x 64 either way
    # last chunk, at layer 1's attention: layer 0 already back to 16, layer 1 holds 12 kept (a quarter of the 48 seen
    # before) + the 16 new
    assert chunked["peak_kv_bytes"] == (16 + 12 + 16) * per_token
    # one pass: layer 0 already compressed to 16 while layer 1 holds all 64
    assert one["peak_kv_bytes"] == (16 + 64) * per_token


@pytest.mark.slow
@pytest.mark.parametrize("config, message", [
    ("nosuch@5", "Unknown press 'nosuch'"),
    ("rkv@0", "Config 'rkv@0': write 'full' or NAME@TOKENS with a positive budget"),
    ("rkv", "Config 'rkv': write 'full' or NAME@TOKENS"),
])
def test_throughput_benchmark_refuses_a_bad_config_in_one_line(config, message):
    done = subprocess.run([sys.executable, "benchmarks/throughput.py", "--configs", "full", config], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
