"""The 95 % interval per report cell (issue #23): the Wilson score interval against hand-computed values, the
t-interval for partial-credit scores, no sample without a crash, and the long-context summary showing both."""

from __future__ import annotations

import json

import pytest

from kvpress_ext.evaluation.intervals import format_score, score_interval, t975, wilson_interval
from kvpress_ext.evaluation.reports.longcontext import summarize, summary_markdown, write_outputs

TOL = 1e-3


@pytest.mark.parametrize(("k", "n", "low", "high"), [
    # p = k/n, c = z^2/n: centre (p + c/2) / (1 + c), half z sqrt(p(1-p)/n + c/(4n)) / (1 + c), worked by hand
    (16, 20, 0.5840, 0.9193),
    (0, 20, 0.0, 0.1611),
    (20, 20, 0.8389, 1.0),
    (1, 2, 0.0945, 0.9055),
    (3, 6, 0.1876, 0.8124),
])
def test_wilson_interval_matches_hand_computed_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=TOL) and hi == pytest.approx(high, abs=TOL)


def test_wilson_interval_of_no_trial_is_none_and_impossible_counts_are_refused():
    assert wilson_interval(0, 0) is None
    with pytest.raises(ValueError, match="between 0 and n"):
        wilson_interval(3, 2)


@pytest.mark.parametrize(("df", "quantile"), [(1, 12.706), (5, 2.571), (30, 2.042), (31, 2.040), (60, 2.000),
                                              (120, 1.980)])
def test_t_quantile_matches_the_standard_table(df, quantile):
    assert t975(df) == pytest.approx(quantile, abs=TOL)


def test_partial_credit_scores_get_a_t_interval_and_pass_fail_scores_a_wilson_one():
    # mean 0.5, sd sqrt(0.02 / 3) = 0.08165, half-width t(3) 3.1824 x 0.08165 / 2 = 0.1299
    ci = score_interval([0.5, 0.5, 0.6, 0.4])
    assert ci["ci_method"] == "t" and ci["k"] is None and ci["n"] == 4
    assert ci["ci_low"] == pytest.approx(0.3701, abs=TOL) and ci["ci_high"] == pytest.approx(0.6299, abs=TOL)
    binary = score_interval([1.0] * 16 + [0.0] * 4)
    assert (binary["ci_method"], binary["k"], binary["n"]) == ("wilson", 16, 20)
    assert binary["ci_low"] == pytest.approx(0.5840, abs=TOL)


def test_cells_without_an_interval_say_so_instead_of_crashing():
    assert score_interval([]) == {"n": 0, "k": None, "ci_low": None, "ci_high": None, "ci_method": None}
    assert format_score([]) == "-" and format_score([None]) == "-"
    assert format_score([0.4]) == "0.40 (1, n/a)"  # one partial-credit sample: no spread to estimate
    assert format_score([1.0] * 16 + [0.0] * 4) == "0.80 (16/20, 0.58-0.92)"
    assert format_score([0.5, 0.5, 0.6, 0.4]) == "0.50 (4, t 0.37-0.63)"


def _rec(method, score, i, ratio=0.0, rate=None, length=1024):
    return {"key": f"{method}-{ratio}-{rate}-{i}", "method": method, "compression_ratio": ratio, "rate": rate,
            "query_aware": False, "length": length, "depth": None, "key_index": i, "score": score, "status": "ok",
            "ttft_s": 0.1}


def _grid():
    records = [_rec("no_press", 1.0 if i < 16 else 0.0, i) for i in range(20)]
    records += [_rec("snapkv", 0.0, i, ratio=0.5) for i in range(20)]
    records += [_rec("knorm", s, i, ratio=0.5) for i, s in enumerate((0.5, 0.5, 0.6, 0.4))]
    records += [_rec("prefill", 1.0, i, ratio=None, length=1024) for i in range(20)]
    records += [_rec("a3-blend", 1.0 if i < 10 else 0.0, i, ratio=None, rate=0.15, length=1024) for i in range(20)]
    records.append({**_rec("a3-blend", None, 99, ratio=None, rate=0.3, length=1024), "status": "failed", "error": "boom"})
    return records


def test_summary_tables_show_the_interval_beside_the_mean():
    md = summary_markdown(_grid(), "needle")
    assert "| no_press | 0 | 0.80 (16/20, 0.58-0.92) | this run |" in md
    assert "| snapkv | 0.5 | 0.00 (0/20, 0.00-0.16) | this run |" in md
    assert "| knorm | 0.5 | 0.50 (4, t 0.37-0.63) | this run |" in md  # partial credit: the t-interval
    assert "| prefill | - | - | 1024 | 20 | 1.00 (20/20, 0.84-1.00) |" in md
    assert "| a3-blend | 0.15 | - | 1024 | 20 | 0.50 (10/20, 0.30-0.70) |" in md
    assert md.count("95 % Wilson score interval") == 2  # the note under the accuracy and the A3 tables
    assert "| (no press accuracy) | 0.80 (20) |" in md  # the safe-ratio table keeps its short form


def test_summary_json_carries_n_and_the_interval_and_a_cell_with_no_sample_has_none(tmp_path):
    written = write_outputs(_grid(), tmp_path / "out", "needle")
    rows = {(r["method"], r["rate"]): r for r in json.loads((tmp_path / "out" / "summary.json").read_text())}
    blend = rows[("a3-blend", 0.15)]
    assert (blend["n"], blend["k"], blend["ci_method"]) == (20, 10, "wilson")
    assert blend["ci_low"] == pytest.approx(0.2993, abs=TOL) and blend["ci_high"] == pytest.approx(0.7007, abs=TOL)
    failed = rows[("a3-blend", 0.3)]
    assert (failed["n"], failed["ci_low"], failed["ci_high"], failed["ci_method"]) == (0, None, None, None)
    assert {(r["method"], r["ci_method"]) for r in summarize(_grid()) if r["n"]} >= {("knorm", "t"),
                                                                                    ("snapkv", "wilson")}
    assert written["summary"] == json.loads((tmp_path / "out" / "summary.json").read_text())
