"""benchmarks/a3_ttft.py reports where A³'s recomputed tokens sit and the attention scores a selective layer
computes against a causal prefill's (what explains a time-to-first-token ratio above the recompute rate)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("a3_ttft", REPO / "benchmarks" / "a3_ttft.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_late_selected_tokens_compute_more_scores_than_early_ones(bench):
    # 1 prefix token, 8 document tokens, 2 question tokens: 11 rows, a causal prefill computes 11 * 11 / 2 scores
    late = bench.selection_stats(torch.tensor([6, 7]), n_prefix=1, n_doc=8, n_question=2)
    early = bench.selection_stats(torch.tensor([0, 1]), n_prefix=1, n_doc=8, n_question=2)
    # rows at positions 7, 8 (document) and 9, 10 (question): (8 + 9 + 10 + 11) / 60.5
    assert late["selective_scores_vs_causal"] == pytest.approx(38 / 60.5, abs=1e-12)
    assert early["selective_scores_vs_causal"] == pytest.approx((2 + 3 + 10 + 11) / 60.5, abs=1e-12)
    assert late["selected_in_last_quarter"] == 1.0 and early["selected_in_last_quarter"] == 0.0
    assert late["selected_mean_position"] == pytest.approx(6.5 / 8) and early["selected_mean_position"] == pytest.approx(0.5 / 8)
