"""``kvpress-ext a3 precompute|ask`` on stories260k: store reuse, .txt splitting, answers and the full-prefill
comparison checked against references computed here directly with the model, and one-line errors (exit 2)."""

import json
import math

import pytest
import torch
from conftest import shared_path

from kvpress_ext.cli import main
from kvpress_ext.cli.a3 import SUMMARY
from kvpress_ext.evaluation.a3_quality import distribution_agreement
from kvpress_ext.presses.a3 import A3Press, ChunkStore
from kvpress_ext.storage.chunk_files import load_chunks

CHUNKS = ["Tom had a big red ball. He liked to play with it in the park.",
          {"text": "One day, Tom saw a little dog. The dog was sad and alone."},
          "Lily and her mom went to the shop to buy some milk and bread."]
QUESTION = "Tom gave the dog"


@pytest.fixture(scope="module")
def model_dir():
    return str(shared_path("models", "stories260k"))


@pytest.fixture(scope="module")
def story_text():
    text = shared_path("data", "tinystories_val.txt").read_text()
    return " ".join(text[:1500].split())  # about 350 tokens of real stories


def _jsonl(path, items):
    path.write_text("\n".join(json.dumps(x) for x in items) + "\n")
    return path


def _ids(tok, text):
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@torch.no_grad()
def _greedy_without_cache(model, ids, max_new_tokens):
    """Reference answer: every step re-reads the whole sequence (no KV cache at all)."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    out = []
    for _ in range(max_new_tokens):
        out.append(int(model(torch.tensor([ids + out])).logits[0, -1].argmax()))
        if out[-1] in eos:
            break
    return out


def test_precompute_twice_reuses_every_chunk(tmp_path, capsys, model_dir, stories260k):
    model, tok = stories260k
    chunks = _jsonl(tmp_path / "chunks.jsonl", CHUNKS)
    store = tmp_path / "store"
    rc, out, _ = _run(capsys, "a3", "precompute", "--model", model_dir, "--chunks", chunks, "--store", store)
    assert rc == 0 and "3 computed, 0 reused" in out
    first = json.loads((store / SUMMARY).read_text())
    texts = [c if isinstance(c, str) else c["text"] for c in CHUNKS]
    assert (first["chunks"], first["computed"], first["reused"]) == (3, 3, 0)
    assert first["tokens"] == sum(len(_ids(tok, t)) for t in texts)
    assert all(ChunkStore(store, model, tok).contains(t) for t in texts)  # the store the library reads

    rc, out, _ = _run(capsys, "a3", "precompute", "--model", model_dir, "--chunks", chunks, "--store", store)
    second = json.loads((store / SUMMARY).read_text())
    assert rc == 0 and (second["chunks"], second["computed"], second["reused"]) == (3, 0, 3)
    assert second["tokens"] == first["tokens"]

    _jsonl(chunks, CHUNKS + ["A new chunk about a cat."])  # only the new chunk is computed
    _run(capsys, "a3", "precompute", "--model", model_dir, "--chunks", chunks, "--store", store)
    third = json.loads((store / SUMMARY).read_text())
    assert (third["chunks"], third["computed"], third["reused"]) == (4, 1, 3)


def test_txt_chunks_tokenize_back_to_the_text(tmp_path, capsys, model_dir, story_text, stories260k):
    _, tok = stories260k
    path = tmp_path / "story.txt"
    path.write_text(story_text)
    expected = _ids(tok, story_text)
    chunks = load_chunks(path, tok, chunk_tokens=40)
    assert [t for c in chunks for t in c] == expected  # in order, nothing lost or added
    assert len(chunks) == math.ceil(len(expected) / 40) and all(len(c) == 40 for c in chunks[:-1])

    rc, _, _ = _run(capsys, "a3", "precompute", "--model", model_dir, "--chunks", path, "--store", tmp_path / "s",
                    "--chunk_tokens", 40)
    summary = json.loads((tmp_path / "s" / SUMMARY).read_text())
    assert rc == 0 and (summary["chunks"], summary["tokens"]) == (len(chunks), len(expected))


@pytest.mark.slow
def test_ask_at_rate_1_answers_like_a_full_prefill(tmp_path, capsys, model_dir, story_text, stories260k):
    model, tok = stories260k
    path, store, out_json = tmp_path / "story.txt", tmp_path / "store", tmp_path / "ask.json"
    path.write_text(story_text)
    _run(capsys, "a3", "precompute", "--model", model_dir, "--chunks", path, "--store", store, "--chunk_tokens", 64)
    rc, out, _ = _run(capsys, "a3", "ask", "--model", model_dir, "--store", store, "--chunks", path, "--chunk_tokens",
                      64, "--question", QUESTION, "--rate", "1.0", "--max_new_tokens", 24, "--compare_full",
                      "--json", out_json)
    assert rc == 0
    result = json.loads(out_json.read_text())
    full_ids = [model.config.bos_token_id] + _ids(tok, story_text) + _ids(tok, QUESTION)  # the concatenated text
    reference = _greedy_without_cache(model, full_ids, 24)
    assert result["answer_ids"] == reference
    assert result["answer"] == tok.decode(reference, skip_special_tokens=True)
    assert f"answer: {result['answer']}" in out
    assert result["context_tokens"] == len(full_ids) - 1 - len(_ids(tok, QUESTION))
    assert result["recomputed"] == result["context_tokens"]  # rate 1: every document token

    full, cmp, t = result["full"], result["comparison"], result["timings"]
    assert full["answer_ids"] == reference and cmp["answers_agree"] is True
    assert cmp["ttft_ratio"] == pytest.approx(t["ttft_s"] / full["ttft_s"], rel=1e-12)
    assert abs(cmp["kl"]) < 1e-4 and cmp["top1"] == 1.0
    assert t["ttft_s"] >= t["load_s"] + t["fuse_s"] > 0
    assert t["decode_tokens_per_s"] == pytest.approx(1 / t["tpot_s"], rel=1e-12)
    assert full["decode_tokens_per_s"] == pytest.approx(1 / full["tpot_s"], rel=1e-12)


def test_compare_full_kl_matches_a_direct_computation(tmp_path, capsys, model_dir, stories260k):
    """At rate 0.3 the fusion differs from the prefill: the reported KL / top-1 equal those computed here."""
    model, tok = stories260k
    chunks, store, out_json = _jsonl(tmp_path / "c.jsonl", CHUNKS), tmp_path / "store", tmp_path / "a.json"
    rc, _, _ = _run(capsys, "a3", "ask", "--model", model_dir, "--store", store, "--chunks", chunks, "--question",
                    QUESTION, "--rate", "0.3", "--compute_missing", "--compare_full", "--max_new_tokens", 4,
                    "--json", out_json)
    assert rc == 0
    result = json.loads(out_json.read_text())
    assert result["chunks_computed_now"] == 3
    ids = [_ids(tok, c if isinstance(c, str) else c["text"]) for c in CHUNKS]
    q = _ids(tok, QUESTION)
    with torch.no_grad():
        full = model(torch.tensor([[model.config.bos_token_id] + [t for c in ids for t in c] + q])).logits[0, -len(q):]
        _, fused = A3Press(strategy="debug", rate=0.3, store=ChunkStore(store, model, tok)).fuse(model, ids, q)
    logp_full, logp = full.float().log_softmax(-1), fused.float().log_softmax(-1)
    kl = float((logp_full.exp() * (logp_full - logp)).sum(-1).mean())
    assert kl > 1e-4  # the comparison can tell a partial recompute from a full one
    assert result["comparison"]["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-7)
    assert result["comparison"]["kl"] == pytest.approx(distribution_agreement(full, fused)[0], rel=1e-4)
    top1 = float((logp.argmax(-1) == logp_full.argmax(-1)).float().mean())
    assert result["comparison"]["top1"] == pytest.approx(top1)
    assert result["comparison"]["answers_agree"] == (result["answer_ids"] == result["full"]["answer_ids"])


def _error(capsys, *argv):
    rc, _, err = _run(capsys, *argv)
    lines = [ln for ln in err.splitlines() if ln.startswith("kvpress-ext: error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_errors_are_one_line_with_the_fix(tmp_path, capsys, model_dir, stories260k):
    chunks, store = _jsonl(tmp_path / "c.jsonl", CHUNKS), tmp_path / "store"
    ask = ["a3", "ask", "--model", model_dir, "--chunks", chunks, "--question", QUESTION, "--max_new_tokens", 2]
    assert "choose from blend, debug" in _error(capsys, *ask, "--store", store, "--strategy", "nope")
    assert "[0, 1]" in _error(capsys, *ask, "--store", store, "--rate", "1.5")
    assert "[0, 1]" in _error(capsys, *ask, "--store", store, "--rate", "abc")
    msg = _error(capsys, *ask, "--store", store)  # no store yet
    assert "store directory not found" in msg and "kvpress-ext a3 precompute" in msg and "--compute_missing" in msg
    msg = _error(capsys, "a3", "ask", "--model", model_dir, "--chunks", tmp_path / "none.json", "--store", store,
                 "--question", QUESTION)
    assert "chunk file not found" in msg and "--chunks" in msg
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    assert "not JSON" in _error(capsys, "a3", "precompute", "--model", model_dir, "--chunks", bad, "--store", store)
    assert "--evict NAME" in _error(capsys, *ask, "--store", store, "--evict_kwargs", "compression_ratio=0.5")

    # chunks absent from an existing store: the message gives the precompute command
    _run(capsys, "a3", "precompute", "--model", model_dir, "--chunks", chunks, "--store", store)
    other = _jsonl(tmp_path / "other.jsonl", ["A chunk that was never precomputed."] + CHUNKS[:1])
    msg = _error(capsys, "a3", "ask", "--model", model_dir, "--chunks", other, "--store", store, "--question", "Hi")
    assert "1 of 2 chunks (first: chunk 0)" in msg and f"--chunks {other}" in msg and "--compute_missing" in msg
    assert "--surprisal" in _error(capsys, *ask, "--store", store, "--strategy", "surprisal_chunk")

    # a corrupt entry: ask names --recompute_bad, and precompute --recompute_bad repairs it
    model, tok = stories260k
    entry = ChunkStore(store, model, tok).chunk_path(_ids(tok, CHUNKS[0]))
    (entry / "metadata.json").write_text("{not json")
    assert "--recompute_bad" in _error(capsys, *ask, "--store", store)
    assert "--recompute_bad" in _error(capsys, "a3", "precompute", "--model", model_dir, "--chunks", chunks,
                                       "--store", store)
    rc, _, _ = _run(capsys, "a3", "precompute", "--model", model_dir, "--chunks", chunks, "--store", store,
                    "--recompute_bad")
    assert rc == 0 and json.loads((store / SUMMARY).read_text())["computed"] == 1
    rc, out, _ = _run(capsys, *ask, "--store", store)
    assert rc == 0 and out.startswith("answer: ")
