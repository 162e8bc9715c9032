"""Needle --task multidoc: a context of N documents from N distinct files, the pass key in the document the depth
picks, one A3 chunk per document, the grid end to end, and bad folders. Tiny model: stories260k (shared folder)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvpress_ext.evaluation import longcontext as lc
from kvpress_ext.evaluation.model_cache import get_model
from kvpress_ext.evaluation.runners.longcontext import run_cell
from kvpress_ext.evaluation.tasks.needle import needle_sample
from kvpress_ext.storage.inputs import shared_dir

REPO = Path(__file__).resolve().parents[1]
MODEL = str(shared_dir() / "models" / "stories260k")
TOPICS = ["apples", "boats", "clocks", "dragons", "eagles", "forests"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Six documents, each a distinct word repeated in sentences (so a document's origin is readable), and a file
    too short to fill a 128-token document (never picked: its context would fall short of its length)."""
    root = tmp_path_factory.mktemp("docs")
    for i, topic in enumerate(TOPICS):
        (root / f"{i}_{topic}.txt").write_text(f"The {topic} were here. " * 60 + "\n\nMore about them. " * 5)
    (root / "9_short.txt").write_text("A short note. " * 30)
    return root


@pytest.fixture(scope="module")
def tok():
    return get_model(MODEL)[1]


def params(folder, **kw):
    return {"source": "needle", "task": "multidoc", "haystack": str(folder), "length": 512, "depth": 0.5,
            "key_index": 0, "seed": 0, "n_needles": 1, "chunk_tokens": 128, **kw}


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("length,chunk", [(512, 128), (384, 96), (520, 128), (768, 128)])
def test_context_is_n_documents_of_distinct_files(folder, tok, length, chunk):
    sample = needle_sample(tok, params(folder, length=length, chunk_tokens=chunk))
    docs = sample.meta["documents"]
    n = length // chunk
    assert len(docs) == n and sample.context == "\n\n".join(docs)
    titles = sample.meta["titles"]
    assert len(set(titles)) == n and set(titles) <= {f"{i}_{t}" for i, t in enumerate(TOPICS)}
    for i, (doc, title) in enumerate(zip(docs, titles)):
        assert doc.startswith(f"Document [{i + 1}] (Title: {title})\n")
        topic = title.split("_")[1]
        body = doc.split("\n", 1)[1]
        assert f"The {topic} were here." in body and not any(t in body for t in TOPICS if t != topic)
        size = len(ids(tok, doc + "\n\n"))
        # as long as fits: one more word of the file would overflow the chunk
        assert size <= chunk and size > chunk - 12


@pytest.mark.parametrize("length,depth,expected", [(640, 0.0, 0), (640, 0.25, 1), (640, 0.5, 2), (640, 0.7, 3),
                                                   (640, 1.0, 4), (256, 0.5, 1), (384, 0.25, 1)])
def test_needle_in_exactly_the_document_the_depth_picks(folder, tok, length, depth, expected):
    sample = needle_sample(tok, params(folder, length=length, depth=depth))  # 128-token documents
    needle = sample.meta["needle_texts"][0]
    assert sample.meta["needle_document"] == expected  # depth x (N - 1), rounded half up
    holding = [i for i, d in enumerate(sample.meta["documents"]) if needle in d]
    assert holding == [expected] and sample.context.count(needle) == 1
    key = sample.answers[0]
    assert 5 <= len(key) <= 7 and key.isdigit() and needle.count(key) == 2
    # the depths of one key move only the needle: same files, same key
    other = needle_sample(tok, params(folder, length=length, depth=1.0 - depth))
    assert other.meta["titles"] == sample.meta["titles"] and other.answers == sample.answers


def test_a3_chunk_boundaries_are_document_boundaries(folder, tok, monkeypatch):
    """The chunks _a3_answer hands to the fusion (captured) are the documents' tokens, one per document."""
    seen = {}
    real = lc.answer

    def spy(model, method, bos, chunks, question_ids, *a, **kw):
        seen["chunks"], seen["question"] = chunks, question_ids
        return real(model, method, bos, chunks, question_ids, *a, **kw)

    monkeypatch.setattr(lc, "answer", spy)
    p = {**params(folder, length=384), "model": MODEL, "max_new_tokens": 2, "max_context_tokens": None,
         "attn_implementation": None, "chat_template": True, "diagnostic": False, "method": "a3-debug",
         "compression_ratio": None, "rate": 0.15, "query_aware": False}
    record = run_cell(p)
    sample = needle_sample(tok, p)
    docs = sample.meta["documents"]
    assert record["n_chunks"] == len(docs) == record["n_documents"] == 3
    chunks = seen["chunks"]
    for i, doc in enumerate(docs):
        assert tok.decode(chunks[i]).strip() == doc.strip()  # exactly one document per chunk
        assert len(chunks[i]) <= 128
    # the chunks are the context's tokens, nothing lost or added: the boundaries are the documents'
    expected = [ids(tok, d + "\n\n") for d in docs[:-1]] + [ids(tok, docs[-1])]
    assert chunks == expected
    # the split does not rely on paragraph packing (which merges documents when a chunk holds two of them)
    assert lc.document_chunks(tok, docs, "\n\n".join(docs)) == expected
    assert len(lc.chunk_context(tok, "\n\n".join(docs), 2 * 128 + 8)) < len(docs)


def needle_script():
    spec = importlib.util.spec_from_file_location("eval_needle", REPO / "evaluation" / "needle.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_quick_grid_with_a_press_and_an_a3_strategy(folder, tmp_path, capsys):
    out = tmp_path / "grid"
    args = ["--task", "multidoc", "--model", MODEL, "--haystack_dir", str(folder), "--quick", "--press",
            "streaming_llm", "--compression_ratio", "0.5", "--strategies", "debug", "--rate", "0.15", "1.0",
            "--output_dir", str(out)]
    assert needle_script().main(args) == 0
    err = capsys.readouterr().err
    # 2 depths x (no_press, streaming_llm, prefill, a3-debug at 2 rates)
    assert "10 cells computed, 0 reused" in err
    cells = [json.loads(p.read_text()) for p in (out / "cells").glob("*.json")]
    assert len(cells) == 10 and all(c["status"] == "ok" for c in cells)
    for c in cells:
        r = c["record"]
        assert r["n_documents"] == 2 and r["needle_document"] == round(c["params"]["depth"])
        assert 0 <= r["score"] <= 1 and c["params"]["chunk_tokens"] == 128
        if c["params"]["method"].startswith("a3-") or c["params"]["method"] == "prefill":
            assert r["n_chunks"] == 2
    # rate 1.0 recomputes every token: the fused cache answers as the full prefill of the same chunks does
    by = {(c["params"]["method"], c["params"]["rate"], c["params"]["depth"]): c["record"] for c in cells}
    for depth in (0.0, 1.0):
        assert by[("a3-debug", 1.0, depth)]["prediction"] == by[("prefill", None, depth)]["prediction"]
    summary = json.loads((out / "summary.json").read_text())
    assert {s["method"] for s in summary} == {"no_press", "streaming_llm", "prefill", "a3-debug"}
    for s in summary:
        assert {"method", "compression_ratio", "query_aware", "length", "depth", "score", "n", "ttft_s"} <= set(s)
        assert s["length"] == 256 and s["n"] == 1
    assert "## A3 fusion" in (out / "summary.md").read_text() and (out / "heatmap_agnostic.png").is_file()
    assert needle_script().main(args) == 0  # resumable
    assert "0 cells computed, 10 reused" in capsys.readouterr().err


ARGS = ["--task", "multidoc", "--model", MODEL]


@pytest.mark.parametrize("make,flags,fix", [
    (lambda d: [(d / f"{i}.txt").write_text("Some words here. " * 50) for i in range(2)],
     ["--lengths", "512", "--chunk_tokens", "128"], "add files"),
    (lambda d: None, ["--lengths", "256", "--chunk_tokens", "128"], "non-empty *.txt"),
    (lambda d: (d / "blank.txt").write_text("  \n\n "), ["--lengths", "256", "--chunk_tokens", "128"],
     "non-empty *.txt"),
    (lambda d: [(d / f"{i}.txt").write_text("Some words. " * 50) for i in range(4)],
     ["--lengths", "100", "--chunk_tokens", "128"], "lengths of at least --chunk_tokens"),
    (lambda d: (d / "one.txt").write_text("Some words. " * 50), ["--haystack_file", "{d}/one.txt"], "--haystack_dir"),
])
def test_bad_folders_one_line_exit_2(tmp_path, capsys, make, flags, fix):
    make(tmp_path)
    flags = [f.format(d=tmp_path) for f in flags]
    code = needle_script().main([*ARGS, "--haystack_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"), *flags])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and fix in lines[0]
    assert not (tmp_path / "out" / "summary.json").exists()


@pytest.mark.slow
def test_too_few_files_exits_2_from_the_command_line(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text("Some words here. " * 200)
    (tmp_path / "short.txt").write_text("Too short to fill a document. " * 10)  # not counted
    r = subprocess.run([sys.executable, str(REPO / "evaluation" / "needle.py"), *ARGS, "--haystack_dir", str(tmp_path),
                        "--lengths", "2048"], check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (f"error: --lengths 2048 needs 4 documents of --chunk_tokens 512 but {tmp_path} has 3 "
                                "*.txt files of at least 512 words: add files, use a smaller --chunk_tokens or shorter "
                                "--lengths")


def test_chunk_too_small_for_title_and_needle_fails_the_cell(folder, tok):
    with pytest.raises(lc.InputError, match="larger --chunk_tokens"):
        needle_sample(tok, params(folder, length=64, chunk_tokens=16))
