"""Chunked prefill as a mode of the long-context grid (``--prefill_chunk_size``) on stories260k: its own cell keys
beside unchanged one-shot keys, the context really fed in chunks, a chunk as long as the context answering as
one-shot, the side-by-side table of summary.md, and bad input."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from kvpress_ext.core.adapters import get_adapter
from kvpress_ext.evaluation.model_cache import get_model
from kvpress_ext.evaluation.runners.longcontext import build_cells, run_cell
from kvpress_ext.storage.inputs import shared_dir
from kvpress_ext.testing import write_story_haystack

REPO = Path(__file__).resolve().parents[1]
MODEL = str(shared_dir() / "models" / "stories260k")
SETTINGS = {"model": MODEL, "max_new_tokens": 6, "chunk_tokens": 32, "max_context_tokens": None,
            "attn_implementation": None, "chat_template": True, "diagnostic": True}


@pytest.fixture(scope="module")
def hay(tmp_path_factory):
    return write_story_haystack(tmp_path_factory.mktemp("hay") / "hay.txt", 6)


def sample(hay, **kw):
    return {"source": "needle", "task": "passkey", "haystack": hay, "length": 120, "depth": 0.5, "key_index": 0,
            "seed": 0, "n_needles": 1, **kw}


def cell(hay, **kw):
    return {**SETTINGS, **sample(hay), "method": "snapkv", "compression_ratio": 0.5, "rate": None,
            "query_aware": False, **kw}


def needle_script():
    spec = importlib.util.spec_from_file_location("eval_needle", REPO / "evaluation" / "needle.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_chunked_cells_have_their_own_keys_and_one_shot_cells_keep_theirs(hay):
    args = ([sample(hay)], ["no_press", "snapkv", "prefill", "a3-debug"], [0.5], [False, True], [0.15], SETTINGS)
    one_shot = build_cells(*args)
    both = build_cells(*args, chunks=[32, 64])
    # the one-shot cells are exactly those of a grid without chunks (same keys, same params: same files reused)
    assert [(c.key, c.params) for c in both if "prefill_chunk_size" not in c.params] == \
        [(c.key, c.params) for c in one_shot]
    chunked = [c for c in both if "prefill_chunk_size" in c.params]
    # snapkv question-agnostic only; no_press, prefill and a3 are never chunked
    assert [(c.params["method"], c.params["query_aware"], c.params["prefill_chunk_size"]) for c in chunked] == \
        [("snapkv", False, 32), ("snapkv", False, 64)]
    assert len({c.key for c in both}) == len(both)
    assert all("__chunk=" in c.key for c in chunked)


@pytest.mark.slow
def test_chunked_cell_feeds_the_context_in_chunks(hay):
    model, _ = get_model(MODEL)
    decoder = get_adapter(model).decoder(model)
    lengths = []
    handle = decoder.register_forward_pre_hook(lambda m, a, kw: lengths.append(kw["input_ids"].shape[1]),
                                               with_kwargs=True)
    try:
        # knorm: no observation window (SnapKV skips chunks shorter than its 64-token window); no diagnostic (its
        # reference forward would come first)
        record = run_cell(cell(hay, method="knorm", prefill_chunk_size=32, diagnostic=False))
    finally:
        handle.remove()
    n = record["compressed_tokens"]
    chunks = [32] * (n // 32) + ([n % 32] if n % 32 else [])
    assert lengths[: len(chunks)] == chunks and len(chunks) > 2
    # the cache keeps 1 - ratio of the compressed part (within one token of rounding), as one-shot prefill does
    assert abs(record["compressed_cache_tokens"] - (n // 2 + record["rest_tokens"])) <= 1


@pytest.mark.slow
@pytest.mark.parametrize("press", ["snapkv", "knorm", "streaming_llm"])
def test_chunk_as_long_as_the_context_answers_as_one_shot(hay, press):
    one_shot = run_cell(cell(hay, method=press))
    chunked = run_cell(cell(hay, method=press, prefill_chunk_size=one_shot["compressed_tokens"]))
    assert chunked["prediction"] == one_shot["prediction"]
    # kvpress keeps int((1 - r) n) entries, the chunk wrapper round((1 - r) n): one token apart at most
    assert abs(chunked["cache_tokens"] - one_shot["cache_tokens"]) <= 1
    assert abs(chunked["needle_kept_mean"] - one_shot["needle_kept_mean"]) <= 0.1


@pytest.mark.slow
def test_cli_summary_shows_chunked_beside_one_shot_and_reuses_cells(hay, tmp_path, capsys):
    out = tmp_path / "grid"
    base = ["--model", MODEL, "--haystack_file", hay, "--quick", "--press", "knorm", "--compression_ratio", "0.5",
            "--output_dir", str(out)]
    assert needle_script().main(base) == 0
    capsys.readouterr()
    assert needle_script().main(base + ["--prefill_chunk_size", "32"]) == 0
    captured = capsys.readouterr()
    # 2 samples x (no_press, knorm one-shot: reused; knorm chunk 32: new)
    assert "2 cells computed, 4 reused" in captured.err
    assert "no_press and A3 always prefill in one pass" in captured.out
    md = (out / "summary.md").read_text()
    table = md[md.index("## Chunked prefill against one-shot"):]
    assert "| press | ratio | 128 agnostic one-shot | 128 agnostic chunk 32 | measured |" in table
    cells = [json.loads(p.read_text()) for p in (out / "cells").glob("*.json")]
    acc = {c["params"].get("prefill_chunk_size"): c["record"]["score"] for c in cells
           if c["params"]["method"] == "knorm" and c["params"]["depth"] == 0.0}
    assert set(acc) == {None, 32}
    row = next(line for line in table.splitlines() if line.startswith("| knorm | 0.5 |"))
    scores = {c["params"].get("prefill_chunk_size"): [] for c in cells}
    for c in cells:
        if c["params"]["method"] == "knorm":
            scores[c["params"].get("prefill_chunk_size")].append(c["record"]["score"])
    caches = {k: [c["record"]["compressed_cache_tokens"] for c in cells if c["params"]["method"] == "knorm"
                  and c["params"].get("prefill_chunk_size") == k] for k in (None, 32)}
    assert row.split(" | ")[2:4] == [f"{sum(scores[k]) / 2:.2f} (2) / {sum(caches[k]) / 2:.0f}" for k in (None, 32)]
    summary = json.loads((out / "summary.json").read_text())
    assert {s["prefill_chunk_size"] for s in summary if s["method"] == "knorm"} == {None, 32}


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["--prefill_chunk_size", "0"], "at least 1 token"),
    (["--prefill_chunk_size", "64", "-8"], "at least 1 token"),
    (["--prefill_chunk_size", "100000"], "larger than the shortest context"),
    (["--prefill_chunk_size", "32", "--query_aware"], "no question-aware mode"),
    (["--prefill_chunk_size", "32", "--press", "no_press"], "add a press"),
])
def test_bad_chunk_sizes_exit_2(hay, tmp_path, capsys, args, message):
    argv = ["--model", MODEL, "--haystack_file", hay, "--quick", "--press", "snapkv", "--output_dir",
            str(tmp_path / "bad"), *args]
    assert needle_script().main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
