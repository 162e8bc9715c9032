"""The press grid of the long-context evaluations (kvpress_ext/evaluation/runners/longcontext.py on kvpress_ext.evaluation.sweep) on
stories260k: each cell against an independent reference (a direct greedy generation, no press, a hand-computed
StreamingLLM kept set), the two modes, resumability and failed cells."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from kvpress_ext.evaluation import longcontext as lc
from kvpress_ext.evaluation.model_cache import get_model
from kvpress_ext.evaluation.reports.longcontext import safe_ratios, summary_markdown
from kvpress_ext.evaluation.runners.longcontext import run_cell, run_cells
from kvpress_ext.evaluation.runners.needle_kept import token_positions
from kvpress_ext.evaluation.sweep import Cell
from kvpress_ext.evaluation.tasks.needle import needle_sample
from kvpress_ext.evaluation.tasks.prompts import split_prompt
from kvpress_ext.storage.inputs import shared_dir
from kvpress_ext.testing import write_story_haystack

REPO = Path(__file__).resolve().parents[1]
MODEL = str(shared_dir() / "models" / "stories260k")


@pytest.fixture(scope="module")
def hay(tmp_path_factory):
    return write_story_haystack(tmp_path_factory.mktemp("hay") / "hay.txt", 6)


def cell(hay, **kw):
    params = {"source": "needle", "task": "passkey", "haystack": hay, "length": 120, "depth": 0.5, "key_index": 0,
              "seed": 0, "n_needles": 1, "model": MODEL, "max_new_tokens": 6, "chunk_tokens": 32,
              "max_context_tokens": None, "attn_implementation": None, "chat_template": True, "diagnostic": True,
              "method": "no_press", "compression_ratio": 0.0, "rate": None, "query_aware": False}
    return {**params, **kw}


def test_no_press_cell_equals_direct_greedy_generation(hay):
    record = run_cell(cell(hay))
    model, tok = get_model(MODEL)
    sample = needle_sample(tok, cell(hay))
    parts = split_prompt(tok, sample.context, sample.question, sample.meta["answer_prefix"])
    # the same token ids (each part tokenized on its own, as kvpress's pipeline does), one generate() call
    ids = torch.tensor([tok(parts.compressed, add_special_tokens=False)["input_ids"]
                        + tok(parts.rest, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert record["prediction"] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert record["compressed_tokens"] + record["rest_tokens"] == ids.shape[1]
    assert record["cache_tokens"] == ids.shape[1]


@pytest.mark.slow
@pytest.mark.parametrize("press", ["snapkv", "knorm", "streaming_llm", "expected_attention", "tova"])
def test_ratio_zero_equals_no_press(hay, press):
    base = run_cell(cell(hay))
    r = run_cell(cell(hay, method=press, compression_ratio=0.0))
    assert r["prediction"] == base["prediction"] and r["cache_tokens"] == base["cache_tokens"]
    assert r["needle_kept"] == [1.0] * len(r["needle_kept"])  # nothing evicted: the whole needle is there


def test_query_aware_compresses_the_question(hay):
    agnostic = run_cell(cell(hay, method="knorm", compression_ratio=0.5))
    aware = run_cell(cell(hay, method="knorm", compression_ratio=0.5, query_aware=True))
    _, tok = get_model(MODEL)
    sample = needle_sample(tok, cell(hay))
    assert sample.question in split_prompt(tok, sample.context, sample.question, query_aware=True).compressed
    assert sample.question not in split_prompt(tok, sample.context, sample.question).compressed
    q = len(tok(sample.question, add_special_tokens=False)["input_ids"])
    assert aware["compressed_tokens"] >= agnostic["compressed_tokens"] + q - 2
    assert aware["rest_tokens"] <= agnostic["rest_tokens"] - q + 2
    # kvpress keeps int(n * (1 - ratio)) of the compressed part; the rest is appended uncompressed
    for r in (agnostic, aware):
        assert r["cache_tokens"] == int(r["compressed_tokens"] * 0.5) + r["rest_tokens"]


def test_needle_kept_matches_streaming_llm_by_hand(hay):
    ratio = 0.5
    r = run_cell(cell(hay, method="streaming_llm", compression_ratio=ratio))
    _, tok = get_model(MODEL)
    sample = needle_sample(tok, cell(hay))
    text = split_prompt(tok, sample.context, sample.question).compressed
    needle = sample.meta["needle_texts"][0]
    positions = token_positions(tok, text, [(text.index(needle), text.index(needle) + len(needle))])
    n = r["compressed_tokens"]
    n_kept = int(n * (1 - ratio))
    kept = set(range(4)) | set(range(n - (n_kept - 4), n))  # 4 sink tokens + the most recent window
    expected = len(kept & set(positions)) / len(positions)
    assert 0 < expected < 1  # the needle straddles the window: a real test of the matching
    assert r["needle_tokens"] == len(positions)
    assert r["needle_kept"] == pytest.approx([expected] * len(r["needle_kept"]), abs=1e-6)


def test_grid_resumes_and_records_failed_cells(tmp_path):
    calls = []

    def run(params):
        calls.append(params["i"])
        if params["i"] == 1:
            raise lc.InputError("cell 1 cannot run: use another one")
        return {"score": params["i"] / 10}

    cells = [Cell(f"c{i}", {"i": i}) for i in range(3)]
    first = run_cells(cells, run, tmp_path, progress=False)
    # kvpress_ext.evaluation.sweep retries a raising cell once (--max_retries 1) before recording it as failed
    assert [r["status"] for r in first] == ["ok", "failed", "ok"] and calls == [0, 1, 1, 2]
    assert "use another one" in first[1]["error"] and first[2]["score"] == 0.2
    second = run_cells(cells, run, tmp_path, progress=False)
    assert calls == [0, 1, 1, 2] and second == first  # nothing recomputed, the failed cell kept
    run_cells(cells, run, tmp_path, progress=False, retry_failed=True)
    assert calls == [0, 1, 1, 2, 1, 1]
    assert json.loads(next((tmp_path / "cells").glob("c1.*.json")).read_text())["attempts"] == 2


def needle_script():
    spec = importlib.util.spec_from_file_location("eval_needle", REPO / "evaluation" / "needle.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_cli_quick_grid_both_modes_failed_cell_and_resume(hay, tmp_path, capsys):
    out = tmp_path / "grid"
    args = ["--model", MODEL, "--haystack_file", hay, "--quick", "--press", "streaming_llm", "kvzip", "rkv",
            "--compression_ratio", "0.5", "--both_modes", "--strategies", "debug", "--output_dir", str(out)]
    assert needle_script().main(args) == 0
    err = capsys.readouterr().err
    records = [json.loads(p.read_text()) for p in (out / "cells").glob("*.json")]
    # 2 samples x (agnostic: no_press, 3 presses, prefill, a3-debug; aware: no_press, 3 presses)
    assert len(records) == 2 * (6 + 4) and "20 cells computed, 0 reused" in err
    failed = [r for r in records if r["status"] == "failed"]
    # cell files of kvpress_ext.evaluation.sweep: params and the cell's record nested
    assert {r["params"]["method"] for r in failed} == {"kvzip"} and all("requires" in r["error"] for r in failed)
    ok = [r for r in records if r["status"] == "ok"]
    assert all(0 <= r["record"]["score"] <= 1 for r in ok)
    assert {r["params"]["method"] for r in ok} == {"no_press", "streaming_llm", "rkv", "prefill", "a3-debug"}
    summary = json.loads((out / "summary.json").read_text())
    for s in summary:
        assert {"method", "compression_ratio", "query_aware", "length", "depth", "score", "n", "ttft_s"} <= set(s)
    md = (out / "summary.md").read_text()
    assert "## Safe ratio" in md and "## Failed cells" in md and "kvzip" in md
    assert (out / "heatmap_agnostic.png").is_file() and (out / "heatmap_aware.png").is_file()
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    assert needle_script().main(args) == 0  # second run: everything reused
    assert "0 cells computed, 20 reused" in capsys.readouterr().err
    assert mtimes == {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}


def test_safe_ratio():
    def rec(method, ratio, score, qa=False):
        return {"method": method, "compression_ratio": ratio, "query_aware": qa, "length": 1024, "depth": 0.5,
                "score": score, "status": "ok"}

    records = [rec("no_press", 0.0, 1.0), rec("no_press", 0.0, 1.0), rec("snapkv", 0.25, 1.0), rec("snapkv", 0.25, 1.0),
               rec("snapkv", 0.5, 1.0), rec("snapkv", 0.5, 0.0), rec("snapkv", 0.75, 1.0), rec("snapkv", 0.75, 1.0),
               rec("knorm", 0.5, 0.0), rec("no_press", 0.0, 0.5, True), rec("knorm", 0.5, 0.5, True)]
    safe = {(s["method"], s["query_aware"]): s for s in safe_ratios(records)}
    assert safe[("snapkv", False)]["safe_ratio"] == 0.75  # the largest ratio that is >= 90 %, not the first gap
    assert safe[("knorm", False)]["safe_ratio"] is None
    assert safe[("knorm", True)]["safe_ratio"] == 0.5  # against no press in its own mode


def test_safe_ratio_is_paired_with_no_press_on_the_same_samples():
    """A grid cut short: the press ran only the depths no press fails at. Unpaired, its 0 / 2 would be judged
    against no press's 2 / 4 (0.5) and fail; on its own samples no press also scores 0, so the press lost nothing.
    And the reverse: the press ran only the easy samples, where no press scores 1."""
    def rec(method, ratio, depth, score):
        return {"method": method, "compression_ratio": ratio, "query_aware": False, "length": 1024,
                "depth": depth, "key_index": 0, "score": score, "status": "ok"}

    records = [rec("no_press", 0.0, d, s) for d, s in ((0.0, 0.0), (0.25, 0.0), (0.5, 1.0), (1.0, 1.0))]
    records += [rec("snapkv", 0.5, 0.0, 0.0), rec("snapkv", 0.5, 0.25, 0.0)]  # the hard samples only
    records += [rec("knorm", 0.5, 0.5, 0.5), rec("knorm", 0.5, 1.0, 0.5)]  # the easy ones: 0.5 < 0.9 x 1.0
    safe = {s["method"]: s for s in safe_ratios(records)}
    assert safe["snapkv"]["safe_ratio"] == 0.5 and safe["snapkv"]["no_press"] == 0.5
    assert safe["knorm"]["safe_ratio"] is None  # unpaired, 0.5 >= 0.9 x 0.5 would have called it safe
    md = summary_markdown(records, "t")
    assert "| (no press accuracy) | 0.50 (4) |" in md
