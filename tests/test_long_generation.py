"""Long generation under decode-time presses: the NLL and generation cells against the full
cache, the cache bound each press promises, and the command line (quick mode, resumed cells, bad input)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvpress_ext.cli.long_generation import main
from kvpress_ext.evaluation import long_generation as lg
from kvpress_ext.evaluation.reports.long_generation import nll_table, relative_diff
from kvpress_ext.testing import tiny_model

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "evaluation" / "long_generation.py"
SHARED = Path(os.environ.get("KVPRESS_EXT_SHARED", REPO.parent / "shared"))
CONTEXT, TOTAL, INTERVAL = 48, 176, 16
COMPRESSING = [m for m in lg.METHODS if m != "full"]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(4, 128, (1, TOTAL), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def full_nll(model, ids):
    return lg.nll_cell(model, ids, CONTEXT, None)


@pytest.fixture(scope="module")
def full_gen(model, ids):
    return lg.generation_cell(model, ids[:, :CONTEXT], None, 40)


@pytest.mark.slow
def test_full_against_itself_is_exact(model, ids, full_nll, full_gen):
    again = lg.nll_cell(model, ids, CONTEXT, None)
    assert again["mean_nll"] == full_nll["mean_nll"]
    assert full_nll["n_scored_tokens"] == TOTAL - CONTEXT
    assert relative_diff(again["mean_nll"], full_nll["mean_nll"]) == 0
    gen = lg.generation_cell(model, ids[:, :CONTEXT], None, 40)
    assert lg.agreement(gen["generated_ids"], full_gen["generated_ids"]) == {"agreement": 1.0, "first_divergence": None}
    # the full cache grows by one entry per generated token, from the prompt
    assert full_gen["cache_len_trace"] == list(range(CONTEXT, CONTEXT + 40))


def test_nll_matches_a_direct_forward(model, ids, full_nll):
    logits = model(input_ids=ids).logits[0, CONTEXT - 1:-1]
    direct = torch.nn.functional.cross_entropy(logits, ids[0, CONTEXT:]).item()
    assert full_nll["mean_nll"] == pytest.approx(direct, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", COMPRESSING)
def test_budget_above_the_sequence_changes_nothing(method, model, ids, full_nll, full_gen):
    press = lg.build_press(method, 4 * TOTAL, INTERVAL)
    cell = lg.nll_cell(model, ids, CONTEXT, press)
    assert cell["mean_nll"] == pytest.approx(full_nll["mean_nll"], abs=1e-5)
    assert cell["cache_len_end"] == TOTAL
    gen = lg.generation_cell(model, ids[:, :CONTEXT], lg.build_press(method, 4 * TOTAL, INTERVAL), 40)
    assert lg.agreement(gen["generated_ids"], full_gen["generated_ids"])["agreement"] == 1.0
    assert gen["cache_len_trace"] == full_gen["cache_len_trace"]


@pytest.mark.slow
@pytest.mark.parametrize("method", COMPRESSING)
def test_small_budget_caps_the_cache(method, model, ids, full_nll):
    budget = 40
    # rkv and DecodingPress compress every INTERVAL decoding steps: the cache may exceed the budget by less than that;
    # lazy_streaming never exceeds its cap; DecodingPress does not compress the prefill (the CONTEXT prompt)
    slack = 0 if method == "lazy_streaming" else INTERVAL
    cell = lg.nll_cell(model, ids, CONTEXT, lg.build_press(method, budget, INTERVAL))
    assert cell["cache_len_end"] <= budget + slack
    assert cell["cache_len_peak"] <= max(budget + slack, CONTEXT + INTERVAL if method.startswith("decoding") else 0)
    assert cell["mean_nll"] != full_nll["mean_nll"]  # it did evict
    gen = lg.generation_cell(model, ids[:, :CONTEXT], lg.build_press(method, budget, INTERVAL), 60)
    assert len(gen["cache_len_trace"]) == 60
    assert max(gen["cache_len_trace"][INTERVAL + 1:]) <= budget + slack, gen["cache_len_trace"]


def test_agreement_counts_positions_and_first_divergence():
    assert lg.agreement([1, 2, 3, 4], [1, 2, 3, 4]) == {"agreement": 1.0, "first_divergence": None}
    assert lg.agreement([1, 9, 3, 4], [1, 2, 3, 4]) == {"agreement": 0.75, "first_divergence": 1}
    assert lg.agreement([1, 2], [1, 2, 3, 4]) == {"agreement": 0.5, "first_divergence": 2}


def test_table_reports_the_rkv_target_as_met_or_missed():
    def rec(method, budget, nll):
        return {"method": method, "budget": budget, "mean_nll": nll, "cache_len_end": 1, "cache_len_peak": 1,
                "seconds": 0.0}

    _, met = nll_table([rec("full", None, 2.0), rec("rkv", 512, 2.03)])
    _, missed = nll_table([rec("full", None, 2.0), rec("rkv", 512, 2.05)])
    assert met["met"] and met["relative_diff_pct"] == pytest.approx(1.5)
    assert not missed["met"] and missed["relative_diff_pct"] == pytest.approx(2.5)
    assert nll_table([rec("rkv", 512, 2.0)])[1] is None


def _run(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "KVPRESS_EXT_SHARED": str(SHARED)}
    return subprocess.run([sys.executable, str(SCRIPT), "--model", str(SHARED / "models" / "stories260k"),
                           "--device", "cpu", "--threads", "1", *args], env=env, capture_output=True, text=True,
                          cwd=REPO, check=False)


@pytest.mark.slow
def test_command_line_quick_writes_results_and_resumes(tmp_path, capsys):
    if not (SHARED / "models" / "stories260k").is_dir():
        pytest.skip("stories260k not found (set KVPRESS_EXT_SHARED)")
    out = tmp_path / "out"
    args = ["--quick", "--methods", "full", "rkv", "--budgets", "48", "--output_dir", str(out)]
    first = _run(*args)
    assert first.returncode == 0, first.stderr
    assert "rkv at budget 512" not in first.stdout  # the target budget is not in the quick grid
    nll = json.loads((out / "nll_summary.json").read_text())
    gen = json.loads((out / "gen_summary.json").read_text())
    assert [r["method"] for r in nll["records"]] == ["full", "rkv"]
    assert gen["records"][0]["agreement"] == 1.0 and len(gen["records"][1]["cache_len_trace"]) == 48
    assert (out / "nll.png").stat().st_size > 0 and (out / "gen_cache.png").stat().st_size > 0
    # the same command again reuses every cell (in-process: the script only calls ``main``)
    assert main(["--model", str(SHARED / "models" / "stories260k"), "--device", "cpu", *args]) == 0
    assert capsys.readouterr().out.count("reused") == 4
    assert json.loads((out / "nll_summary.json").read_text())["records"] == nll["records"]


@pytest.mark.parametrize("args, words", [
    (["--budgets", "0"], "positive integers"),
    (["--budgets", "-5"], "positive integers"),
    (["--text_file", "/nonexistent/long.txt"], "does not exist"),
    (["--methods", "rkvv"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(args, words, tmp_path, capsys):
    """In-process (the script only calls ``main``): rejected before any model is loaded."""
    try:
        code = main(["--quick", "--model", "/nonexistent/model", *args, "--output_dir", str(tmp_path / "out")])
    except SystemExit as exc:  # argparse's errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], err
    assert not (tmp_path / "out").exists()


def test_max_seconds_starts_no_cell_after_the_limit(tmp_path, capsys):
    if not (SHARED / "models" / "stories260k").is_dir():
        pytest.skip("stories260k not found (set KVPRESS_EXT_SHARED)")
    code = main(["--model", str(SHARED / "models" / "stories260k"), "--device", "cpu", "--quick", "--part", "nll",
                    "--max_seconds", "0", "--output_dir", str(tmp_path / "out")])
    assert code == 0
    assert "9 cell(s) not run" in capsys.readouterr().out
    assert not (tmp_path / "out" / "nll_summary.json").exists()


def test_cells_put_full_then_the_target_budget_first():
    grid = lg.cells(["rkv", "full", "lazy_streaming"], [256, 512, 1024], first_budget=512)
    assert [c.name for c in grid] == ["full", "rkv_b512", "lazy_streaming_b512", "rkv_b256", "lazy_streaming_b256",
                                      "rkv_b1024", "lazy_streaming_b1024"]


@pytest.mark.parametrize("method", ["decoding_snapkv", "decoding_streaming_llm"])
def test_decoding_methods_keep_token_order_and_do_not_warn(method, recwarn):
    """DecodingPress compresses the same cache every interval, so its scorer runs in TemporalOrderPress
    (tests/test_temporal_order.py shows what goes wrong without it); ratio 0 on the scorer is DecodingPress's
    business, so no 'compresses nothing' warning reaches the user."""
    from kvpress_ext.core.temporal_order import TemporalOrderPress

    press = lg.build_press(method, 256, compression_interval=32)
    assert isinstance(press.base_press, TemporalOrderPress)
    assert type(press.base_press.press).__name__ == ("SnapKVPress" if method == "decoding_snapkv" else "StreamingLLMPress")
    assert press.target_size == 256 and press.compression_interval == 32
    assert not [w for w in recwarn if "compress nothing" in str(w.message)]
