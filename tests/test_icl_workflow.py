"""Compress-in-context workflow end to end on stories260k: mechanics and invariants, not accuracy."""

import csv
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kvpress_ext.cli import main
from kvpress_ext.icl import workflow as wf
from kvpress_ext.storage.cache_files import load_cache
from kvpress_ext.testing import tiny_tokenizer

SHARED = Path(os.environ.get("KVPRESS_EXT_SHARED", Path(__file__).resolve().parents[1] / ".." / "shared"))
MODEL = str(SHARED / "models" / "stories260k")
DOCS = [
    {"question": "Tom has 2 apples and gets 3 more. How many?", "solution": "2 + 3 = 5.", "answer": "5"},
    {"question": "Lily has 4 toys and gives 1 away. How many?", "solution": "4 - 1 = 3.", "answer": "3"},
]
CACHE_ARGS = ["--budget", "32", "--window_size", "4", "--buffer", "8", "--max_note_tokens", "12"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("icl") / "data.json"
    path.write_text(json.dumps(DOCS))
    return path


@pytest.fixture(scope="module")
def cache_dir(data):
    out = data.parent / "cache"
    assert main(["icl", "precompute", "--data", str(data), "--model", MODEL, "--mode", "takeaways", "--rotate",
                 "--out", str(out), *CACHE_ARGS]) == 0
    return out


def test_precompute_saves_bounded_cache_with_documents_and_notes(cache_dir):
    _cache, meta = load_cache(cache_dir)
    assert all(n <= 32 + 8 for n in meta["seq_lengths"])
    assert meta["extra"]["documents"] == DOCS
    notes = meta["extra"]["notes"]
    assert [n["document"] for n in notes] == [0, 1] and all(1 <= n["tokens"] <= 12 for n in notes)
    assert meta["extra"]["tokens_seen"] == meta["positions"]["seen_tokens"] > max(meta["seq_lengths"])
    assert meta["positions"]["rotated"] and meta["positions"]["next_position"] < meta["positions"]["seen_tokens"]
    assert meta["press"]["name"] == "rkv" and meta["press"]["params"]["budget"] == 32


def test_precompute_skips_existing_unless_recompute(cache_dir, data, capsys):
    stamp = (cache_dir / "metadata.json").stat().st_mtime_ns
    assert main(["icl", "precompute", "--data", str(data), "--model", MODEL, "--mode", "takeaways", "--rotate",
                 "--out", str(cache_dir), *CACHE_ARGS]) == 0
    assert "skipping" in capsys.readouterr().out
    assert (cache_dir / "metadata.json").stat().st_mtime_ns == stamp
    # other settings over the same cache: refused in one line naming --recompute, never "skipping"
    assert main(["icl", "precompute", "--data", str(data), "--model", MODEL, "--out", str(cache_dir), *CACHE_ARGS]) == 2
    err = capsys.readouterr().err
    assert "other settings: rotate True (asked False)" in err and "--recompute" in err and len(err.splitlines()) == 1
    assert (cache_dir / "metadata.json").stat().st_mtime_ns == stamp


def test_mode_none_reads_only(data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(MODEL).eval(), AutoTokenizer.from_pretrained(MODEL)
    meta = wf.precompute(model, tok, DOCS, tmp_path / "c", budget=16, mode="none", window_size=4)
    n_tokens = sum(len(tok(wf.format_document(d), add_special_tokens=i == 0)["input_ids"]) for i, d in enumerate(DOCS))
    assert meta["extra"]["notes"] == [] and meta["extra"]["tokens_seen"] == n_tokens
    assert meta["seq_lengths"] == [16] * 5 and not meta["positions"]["rotated"]


def test_eval_samples_from_untouched_copies_and_score(cache_dir, data, tmp_path, capsys):
    out = tmp_path / "eval.json"
    before = (cache_dir / "tensors.safetensors").read_bytes()
    assert main(["icl", "eval", "--cache", str(cache_dir), "--model", MODEL, "--data", str(data), "--data_limit", "1", "--repeat", "2",
                 "--temperature", "0", "--max_new_tokens", "6", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (cache_dir / "tensors.safetensors").read_bytes() == before
    assert result["cache_length"] == max(load_cache(cache_dir)[1]["seq_lengths"])
    for rec in result["records"]:
        # greedy from identical starting caches: identical samples (a reused cache would drift)
        assert len(rec["generations"]) == 2 and rec["generations"][0] == rec["generations"][1]
        assert rec["lengths"] == [6, 6]
    # score a file with known answers
    rec = {"question": "q", "answer": "5", "generations": ["so 5", "it is 4", "answer: 5", "7"]}
    fake = tmp_path / "fake.json"
    fake.write_text(json.dumps({"records": [rec]}))
    assert main(["icl", "score", "--eval", str(fake), "--csv", str(tmp_path / "s.csv")]) == 0
    assert "2/4" in capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert float(rows[0]["pass_at_k"]) == pytest.approx(0.5)


def test_bad_input_exits_2_with_one_line(tmp_path, data, capsys):
    assert main(["icl", "eval", "--cache", str(tmp_path / "missing"), "--model", MODEL, "--question", "hi",
                 "--out", str(tmp_path / "e.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No saved cache" in err[0]
    assert main(["icl", "precompute", "--data", str(data), "--model", MODEL, "--budget", "4", "--window_size", "8",
                 "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--budget" in err[0]
    assert main(["icl", "precompute", "--data", str(tmp_path / "nodata.json"), "--model", MODEL,
                 "--out", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "c").exists()


class _ScriptedModel(torch.nn.Module):
    """Emits a fixed token script regardless of input (to test stopping)."""

    def __init__(self, script):
        super().__init__()
        self.script, self.i = script, 0
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.generation_config = SimpleNamespace(eos_token_id=None)

    def forward(self, input_ids, past_key_values=None, logits_to_keep=None):
        logits = torch.zeros(1, 1, 128)
        logits[0, 0, self.script[min(self.i, len(self.script) - 1)]] = 1.0
        self.i += 1
        return SimpleNamespace(logits=logits)


def test_sentinel_stops_on_generated_text_only_even_when_split():
    tok = tiny_tokenizer()
    model = _ScriptedModel(tok("ab<END>zzzz", add_special_tokens=False)["input_ids"])
    prompt = tok(f"say {wf.SENTINEL} when done", add_special_tokens=False)["input_ids"]  # sentinel in the prompt
    text, gen = wf.generate(model, tok, None, prompt, 20, stop=wf.SENTINEL)
    assert text == "ab" and len(gen) == len("ab<END>")  # one character per token: the sentinel spans 5 tokens
    model = _ScriptedModel(tok("abcdef", add_special_tokens=False)["input_ids"])
    text, gen = wf.generate(model, tok, None, prompt, 4, stop=wf.SENTINEL)
    assert text == "abcd" and len(gen) == 4


@pytest.mark.slow
def test_grid_is_resumable_and_writes_table_and_plot(data, tmp_path, capsys):
    args = ["icl", "grid", "--data", str(data), "--model", MODEL, "--budgets", "16,24", "--modes", "none,takeaways",
            "--out_dir", str(tmp_path), "--eval_limit", "1", "--repeat", "1", "--max_new_tokens", "4", "--temperature", "0",
            "--window_size", "4", "--buffer", "8", "--max_note_tokens", "6"]
    assert main(args) == 0
    rows = list(csv.DictReader((tmp_path / "grid.csv").open()))
    assert [(r["budget"], r["mode"]) for r in rows] == [("16", "none"), ("24", "none"), ("16", "takeaways"),
                                                        ("24", "takeaways")]
    assert all(int(r["cache_length"]) <= int(r["budget"]) + 8 for r in rows)
    assert (tmp_path / "grid.png").stat().st_size > 1000
    # one sweep cell file each (kvpress_ext.evaluation.sweep), named by its key and the digest of its settings
    cells = sorted(p.name.split(".")[0] for p in (tmp_path / "cells").glob("*.json"))
    assert cells == ["b16_none", "b16_takeaways_simple", "b24_none", "b24_takeaways_simple"]
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/eval.json")}
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/eval.json")} == stamps
