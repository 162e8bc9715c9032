"""Concurrent writers: two ``a3 precompute`` into one store and two ``icl precompute`` to one
``--out``, each at least 20 times. File locks per chunk entry and per cache mean: no chunk is computed twice (the
second writer waits and reuses it), both writers succeed, the results equal a single writer's, no temporaries
are left, never a traceback.

The 20+ rounds use threads (each with its own model copy, store object and tokenizer, as separate processes
would have): ``flock`` locks bind open file descriptions, so threads exclude each other like processes. One more
round runs two real (forked) ``kvpress-ext`` processes on stories260k.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import sys
import threading
import traceback

import pytest
import torch
from conftest import shared_path

from kvpress_ext.cli import main
from kvpress_ext.icl import workflow as wf
from kvpress_ext.presses.a3 import ChunkStore
from kvpress_ext.storage.cache_files import load_cache
from kvpress_ext.testing import tiny_model, tiny_tokenizer

ROUNDS = 24


def _race(fns):
    """Run every ``fn`` in its own thread, released together; returns results, re-raises the first error."""
    barrier = threading.Barrier(len(fns))
    results, errors = [None] * len(fns), []

    def run(i):
        barrier.wait()
        try:
            results[i] = fns[i]()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a writer hung"
    if errors:
        raise errors[0]
    return results


def _leftovers(root):
    return [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files
            if ".tmp-" in n or ".new-" in n or ".old-" in n or n.endswith(".lock")]


@pytest.fixture(scope="module")
def models():
    model = tiny_model("llama", layers=2)
    return [model, copy.deepcopy(model)]


@pytest.mark.slow
def test_two_a3_writers_never_compute_a_chunk_twice(models, tmp_path):
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randint(4, 128, (n,), generator=g).tolist() for n in (12, 7, 15, 9, 11)]
    reference = ChunkStore(tmp_path / "reference", models[0])
    reference.precompute(chunks)
    waited = 0
    for r in range(ROUNDS):
        root = tmp_path / f"store{r}"
        stores = [ChunkStore(root, m) for m in models]
        # opposite orders: the writers meet in the middle, each waiting on an entry the other is computing
        orders = [chunks, chunks[::-1]] if r % 2 else [chunks, chunks]
        _race([lambda s=s, o=o: s.precompute(o) for s, o in zip(stores, orders)])
        assert sum(s.misses for s in stores) == len(chunks) + 1  # every chunk and the BOS prefix exactly once
        waited += min(s.hits for s in stores) > 0
        for c in chunks:
            got, want = stores[1].get(c), reference.get(c)
            assert all(torch.equal(a, b) for a, b in zip(got.keys + got.values, want.keys + want.values))
        assert _leftovers(root) == []
    assert waited > 0  # the race was real: some round had both writers reuse each other's entries


@pytest.mark.slow
def test_two_icl_writers_to_one_out_compute_once(tmp_path):
    docs = [{"question": "2 + 3?", "solution": "2 + 3 = 5.", "answer": "5"},
            {"question": "4 - 1?", "solution": "4 - 1 = 3.", "answer": "3"}]
    model = tiny_model("llama", layers=2)
    pairs = [(model, tiny_tokenizer()), (copy.deepcopy(model), tiny_tokenizer())]
    kwargs = {"budget": 24, "window_size": 4, "buffer": 8, "mode": "takeaways", "max_note_tokens": 4}
    reference = wf.precompute(model, pairs[0][1], docs, tmp_path / "reference", **kwargs)
    for r in range(ROUNDS):
        out = tmp_path / f"run{r}" / "cache"
        metas = _race([lambda m=m, t=t, o=out: wf.precompute(m, t, docs, o, **kwargs) for m, t in pairs])
        assert sorted(meta["reused"] for meta in metas) == [False, True]  # one computed, the other reused it
        _cache, meta = load_cache(out, model=model)
        assert meta["seq_lengths"] == reference["seq_lengths"] and meta["extra"]["notes"] == reference["extra"]["notes"]
        assert sorted(os.listdir(out.parent)) == ["cache"]  # no lock file or temporary left
    # --recompute from two writers at once: both succeed, one valid cache remains
    metas = _race([lambda m=m, t=t: wf.precompute(m, t, docs, out, recompute=True, **kwargs) for m, t in pairs])
    assert [meta["reused"] for meta in metas] == [False, False]
    assert load_cache(out, model=model)[1]["seq_lengths"] == reference["seq_lengths"]
    assert sorted(os.listdir(out.parent)) == ["cache"]


def _child(argv_lists, log_prefix):
    """Body of a forked writer process: run each command line, exit with 10 * rc1 + rc2 (output to files)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    with open(f"{log_prefix}.out", "w") as out, open(f"{log_prefix}.err", "w") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdout, sys.stderr = out, err  # (pytest replaced the Python-level streams)
        code = 99
        try:
            rcs = [main(argv) for argv in argv_lists]
            code = 10 * rcs[0] + rcs[1]
        except BaseException:  # noqa: BLE001 - a traceback is what the test must never see
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


@pytest.mark.slow
def test_two_processes(tmp_path):
    """Two real processes (forked, so no second interpreter start-up), each running ``a3 precompute`` then
    ``icl precompute`` on the same paths."""
    model = str(shared_path("models", "stories260k"))
    chunks = tmp_path / "chunks.json"
    chunks.write_text(json.dumps([f"Once upon a time, there was a {w} who liked to play." for w in
                                  ("cat", "dog", "girl", "boy", "bird", "frog", "king", "tree")]))
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"question": "Tom has 2 apples and gets 3 more.", "solution": "5", "answer": "5"}]))
    argv = [["a3", "precompute", "--model", model, "--chunks", str(chunks), "--store", str(tmp_path / "s")],
            ["icl", "precompute", "--model", model, "--data", str(data), "--out", str(tmp_path / "c"),
             "--budget", "32", "--window_size", "4", "--max_note_tokens", "8"]]
    logs = tmp_path / "logs"
    logs.mkdir()
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_child, args=(argv, str(logs / str(i)))) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    outs = [((logs / f"{i}.out").read_text(), (logs / f"{i}.err").read_text()) for i in range(2)]
    for p, (out, err) in zip(procs, outs):
        assert p.exitcode == 0 and "Traceback" not in err, err
    computed = [int(out.split(" computed")[0].rsplit(" ", 1)[1]) for out, _ in outs]
    assert sum(computed) == 8  # each of the 8 chunks computed by exactly one of the two processes
    assert sum("saved cache" in out for out, _ in outs) == 1  # one wrote the cache, the other reused it
    assert _leftovers(tmp_path) == []
    assert load_cache(tmp_path / "c")[1]["extra"]["tokens_seen"] > 0
