"""Long-context evaluation scripts (evaluation/{longbench,needle,ruler}.py) end to end on tiny local inputs
with stories260k. The model cannot retrieve anything: these tests check the mechanics (files, fields,
scoring, and that fusion at rate 1.0 answers exactly like a full prefill: same greedy tokens)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvpress_ext.evaluation import longcontext as lc
from kvpress_ext.evaluation.metrics import score_longbench, substring_match
from kvpress_ext.evaluation.model_cache import get_model
from kvpress_ext.evaluation.tasks.needle import needle_sample
from kvpress_ext.evaluation.tasks.prompts import cell_prompt, context_limit
from kvpress_ext.storage.inputs import shared_dir

REPO = Path(__file__).resolve().parents[1]
MODEL = shared_dir() / "models" / "stories260k"
COMMON = ["--model", str(MODEL), "--rate", "1.0", "--max_new_tokens", "4", "--chunk_tokens", "24", "--no_progress"]
FIELDS = {"key", "method", "status", "prediction", "answers", "score", "ttft_s", "tpot_s", "context_tokens",
          "compression_ratio", "query_aware"}

SENTENCES = ["Tom had a red ball.", "He played in the park with his dog.", "The sun was warm and the sky was blue.",
             "Lily liked to bake cakes.", "One day she made a big cake for her mom.", "They ate it under a tree.",
             "The cat sat on the mat all day.", "A bird sang a happy song."]


def script(name):
    spec = importlib.util.spec_from_file_location(f"eval_{name}", REPO / "evaluation" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_script(name, *args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "evaluation" / f"{name}.py"), *map(str, args)],
                          check=False, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("longcontext")
    lb = [{"context": "\n\n".join(SENTENCES[:5]), "input": "What color was the ball?", "answers": ["red"],
           "all_classes": None, "_id": "a"},
          {"context": "\n\n".join(SENTENCES[3:]), "input": "What did Lily bake?", "answers": ["cake", "cakes"],
           "_id": "b"}]
    (d / "lb.jsonl").write_text("\n".join(json.dumps(r) for r in lb))
    ruler = [{"index": i, "context": " ".join(SENTENCES) + f" The magic number is {n}. " + " ".join(SENTENCES[:3]),
              "question": " What is the magic number?", "answer_prefix": " The magic number is", "outputs": [str(n)]}
             for i, n in enumerate((4821, 77))]
    (d / "ruler.jsonl").write_text("\n".join(json.dumps(r) for r in ruler))
    hay = d / "hay"
    hay.mkdir()
    (hay / "a.txt").write_text(" ".join(SENTENCES * 3))
    (hay / "b.txt").write_text(" ".join(reversed(SENTENCES * 3)))
    return d


def load_cells(out: Path) -> list[dict]:
    """The cell files (kvpress_ext.evaluation.sweep format) as flat records: params, the cell's record, status, error."""
    cells = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]
    return [{"key": c["key"], **c["params"], **(c["record"] or {}), "status": c["status"], "error": c["error"]}
            for c in cells]


def by_method(records):
    out = {}
    for r in records:
        out.setdefault(r["method"], []).append(r)
    return out


def assert_fusion_matches_prefill(records, n):
    runs = by_method(records)
    key = lambda r: r["sample_id"]
    prefill = {key(r): r["prediction"] for r in runs["prefill"]}
    assert len(prefill) == n
    for name, recs in runs.items():
        for r in recs:
            assert FIELDS <= set(r) and r["status"] == "ok", (name, r.get("error"))
            assert r["ttft_s"] > 0 and (r["tpot_s"] is None or r["tpot_s"] > 0)
        if name.startswith("a3-") and "+" not in name:  # exact: same greedy tokens at rate 1.0
            assert {key(r): r["prediction"] for r in recs} == prefill, name
            assert all(r["recomputed"] == r["context_tokens"] - r["prefix_tokens"] for r in recs)


@pytest.mark.slow
def test_longbench_end_to_end(inputs):
    out = inputs / "out_lb"
    code = script("longbench").main(["--task", "hotpotqa", "--data_file", str(inputs / "lb.jsonl"),
                                     "--strategies", "blend", "debug", "--evict", "streaming_llm",
                                     "--compression_ratio", "0.5", "--output_dir", str(out), *COMMON])
    assert code == 0
    records = load_cells(out)
    runs = by_method(records)
    assert set(runs) == {"no_press", "prefill", "a3-blend", "a3-debug", "a3-blend+streaming_llm",
                         "a3-debug+streaming_llm"}
    assert_fusion_matches_prefill(records, 2)
    for r in records:
        assert r["score"] == score_longbench("hotpotqa", r["prediction"], r["answers"])
    full = {r["sample_id"]: r["cache_tokens"] for r in runs["a3-blend"]}
    assert all(r["cache_tokens"] < full[r["sample_id"]] for r in runs["a3-blend+streaming_llm"])  # eviction shrank it
    summary = (out / "summary.md").read_text()
    assert all(f"| {name} |" in summary for name in runs)
    assert {s["method"] for s in json.loads((out / "summary.json").read_text())} == set(runs)


@pytest.mark.slow
def test_needle_end_to_end(inputs):
    out = inputs / "out_needle"
    code = script("needle").main(["--haystack_dir", str(inputs / "hay"), "--lengths", "48", "96", "--depths", "0",
                                  "0.5", "1", "--num_keys", "1", "--strategies", "debug", "--output_dir", str(out),
                                  *COMMON])
    assert code == 0
    records = load_cells(out)
    assert set(by_method(records)) == {"no_press", "prefill", "a3-debug"}
    assert_fusion_matches_prefill(records, 6)
    recs = by_method(records)["no_press"]
    assert {(r["length"], r["depth"]) for r in recs} == {(n, d) for n in (48, 96) for d in (0.0, 0.5, 1.0)}
    for r in recs:
        assert 0.8 * r["length"] <= r["context_tokens"] - 1 <= 1.1 * r["length"]
        assert r["score"] == substring_match(r["prediction"], r["answers"])
        assert 5 <= len(r["answers"][0]) <= 7 and r["answers"][0].isdigit()  # a 5-7 digit pass key
    assert (out / "heatmap_agnostic.png").stat().st_size > 1000
    assert "## Accuracy" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_ruler_end_to_end(inputs):
    out = inputs / "out_ruler"
    code = script("ruler").main(["--data_file", str(inputs / "ruler.jsonl"), "--strategies", "blend",
                                 "--max_samples", "2", "--output_dir", str(out), *COMMON])
    assert code == 0
    records = load_cells(out)
    assert set(by_method(records)) == {"no_press", "prefill", "a3-blend"}
    assert_fusion_matches_prefill(records, 2)
    for r in records:
        assert r["score"] == substring_match(r["prediction"], r["answers"])


def test_ruler_generator_and_haystack(inputs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL)
    hay = str(inputs / "hay")
    for task, n_answers in (("niah_single", 1), ("multikey", 1), ("multivalue", 3)):
        params = {"task": task, "haystack": hay, "length": 96, "depth": 0.5, "key_index": 0, "seed": 1,
                  "n_needles": 3}
        s = needle_sample(tok, params)
        assert s.id == needle_sample(tok, params).id and s.context == needle_sample(tok, params).context
        assert len(s.answers) == n_answers and all(a in s.context and a not in s.question for a in s.answers)
        assert s.context.count("special magic numbers for") == (1 if task == "niah_single" else 3)
    context, where = lc.build_haystack(tok, lc.load_haystack(inputs / "hay"), 80, 1.0, "NEEDLE.")
    assert context.rstrip().endswith("NEEDLE.") and where > 0
    chunks = lc.chunk_context(tok, context, 16)
    assert all(1 <= len(c) <= 16 for c in chunks) and len(chunks) > 3


@pytest.mark.slow
@pytest.mark.parametrize("name,args,message", [
    ("longbench", ["--data_file", "/nonexistent/x.jsonl"], "does not exist"),
    ("longbench", ["--data_file", "LB", "--strategies", "nope"], "unknown strategy"),
    ("longbench", ["--data_file", "LB", "--evict", "no_such_press"], "no_such_press"),
    ("longbench", ["--data_file", "LB", "--task", "nosuchtask"], "unknown LongBench task"),
    ("needle", ["--haystack_dir", "/nonexistent"], "haystack"),
    ("ruler", ["--data_file", "/nonexistent/x.jsonl"], "does not exist"),
    ("ruler", ["--press", "snapkv", "--compression_ratio", "1.5"], "compression_ratio"),
    ("needle", ["--press", "snapkv", "--compression_ratio", "-0.1"], "[0, 1)"),
    ("needle", ["--press", "no_such_press"], "no_such_press"),
    ("needle", ["--lengths", "5000"], "exceed the model's context"),
    ("needle", ["--haystack_file", "EMPTY"], "empty"),
    ("needle", ["--strategies", "debug", "--query_aware"], "question-aware"),
    ("needle", ["--press", "a3"], "--strategies"),
])
def test_bad_input_exits_2(inputs, capsys, name, args, message):
    (inputs / "empty.txt").write_text("   \n")
    args = [str(inputs / "lb.jsonl") if a == "LB" else str(inputs / "empty.txt") if a == "EMPTY" else a for a in args]
    if name == "needle" and "--haystack_file" not in args and "--haystack_dir" not in args:
        args += ["--haystack_dir", str(inputs / "hay")]
    assert script(name).main(args + ["--model", str(MODEL), "--output_dir", str(inputs / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.slow
def test_bad_input_subprocess_exit_code(inputs):
    p = run_script("ruler", "--data_file", inputs / "missing.jsonl", "--model", MODEL)
    assert p.returncode == 2 and "does not exist" in p.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_length_preflight_agrees_with_the_cells(inputs, capsys):
    """The length named as the longest that fits runs; one token more is refused before any cell starts (the
    preflight measures the real prompt: chat template, needle, question, answer prefix, max_new_tokens)."""
    args = ["--haystack_dir", str(inputs / "hay"), "--model", str(MODEL), "--depths", "0", "1", "--num_keys", "1",
            "--max_new_tokens", "4", "--both_modes", "--no_progress"]
    assert script("needle").main(args + ["--lengths", "600", "--output_dir", str(inputs / "pre0")]) == 2
    err = capsys.readouterr().err.strip()
    longest = int(err.rsplit(" ", 1)[-1])
    assert 300 < longest < 512, err
    model, tok = get_model(str(MODEL))
    settings = {"model": str(MODEL), "max_new_tokens": 4, "chunk_tokens": 128, "max_context_tokens": None,
                "attn_implementation": None, "chat_template": True, "diagnostic": True}
    for n, fits in ((longest, True), (longest + 1, False)):
        totals = []
        for depth in (0.0, 1.0):
            for aware in (False, True):
                sample = {"source": "needle", "task": "passkey", "haystack": str(inputs / "hay"), "length": n,
                          "depth": depth, "key_index": 0, "seed": 0, "n_needles": 4, "query_aware": aware}
                _, _, ids, rest = cell_prompt(tok, {**settings, **sample})
                totals.append(len(ids) + len(rest) + 4)
        assert (max(totals) <= context_limit(model)) == fits, (n, totals)
    out = inputs / "pre1"
    assert script("needle").main(args + ["--lengths", str(longest), "--output_dir", str(out)]) == 0
    cells = [json.loads(p.read_text()) for p in (out / "cells").glob("*.json")]
    assert cells and all(c["status"] == "ok" for c in cells), [c.get("error") for c in cells]
