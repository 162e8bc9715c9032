"""The sweep executor (kvpress_ext.evaluation.sweep): cell files, resume, retries and failures, locally and on a local Ray
with 2 CPUs (one Ray session for the module); a 4-cell perplexity sweep (and its baseline) on stories260k gives
the same records through Ray as in-process, timings and machine load aside."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from kvpress_ext.evaluation.runners.perplexity import PerplexityConfig, run
from kvpress_ext.evaluation.sweep import Cell, SweepError, SweepOptions, cell_key, load_cells, run_sweep

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KVPRESS_EXT_SHARED", REPO.parent / "shared"))
MODEL = SHARED / "models" / "stories260k"
TEXT = SHARED / "data" / "tinystories_val.txt"
TIMING_KEYS = {"seconds", "ttft_s", "decode_tok_per_s", "prefill_s", "decode_s", "json_path", "load_start", "load_end"}


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray with 2 CPUs for every Ray test here (starting Ray takes seconds); run_sweep uses an open
    session as it is and leaves it running."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def _square(params):
    return {"y": params["x"] ** 2}


def test_cells_files_resume_and_changed_params(tmp_path):
    calls, out = tmp_path / "calls.txt", tmp_path / "out"

    def fn(params):
        with calls.open("a") as fh:
            fh.write(f"{params['x']}\n")
        return {"y": params["x"] ** 2}

    cells = [Cell(cell_key("sq", x=x), {"x": x, "_note": "context"}) for x in range(3)]
    first = run_sweep(cells, fn, out, SweepOptions(progress=False))
    assert first.records == {"sq_x=0": {"y": 0}, "sq_x=1": {"y": 1}, "sq_x=2": {"y": 4}}
    files = load_cells(out)
    assert [f["key"] for f in files] == ["sq_x=0", "sq_x=1", "sq_x=2"]
    assert all(f["status"] == "ok" and f["attempts"] == 1 and f["executor"] == "local" for f in files)
    assert not list((out / "cells").glob(".*"))  # no temporary files left behind
    # Second run: nothing recomputed ("_" params are context and do not count); a changed param is recomputed.
    cells[1] = Cell("sq_x=1", {"x": 5, "_note": "other"})
    cells[0] = Cell("sq_x=0", {"x": 0, "_note": "other"})
    second = run_sweep(cells, fn, out, SweepOptions(progress=False))
    assert second.skipped == ["sq_x=0", "sq_x=2"] and second.records["sq_x=1"] == {"y": 25}
    assert calls.read_text().split() == ["0", "1", "2", "5"]


def test_local_retries_then_records_failure_and_goes_on(tmp_path):
    marker = tmp_path / "flaky-seen"

    def fn(params):
        if params["kind"] == "broken":
            raise ValueError(f"cell {params['i']} is broken")
        if params["kind"] == "flaky" and not marker.exists():
            marker.touch()
            raise RuntimeError("transient")
        return {"i": params["i"]}

    cells = [Cell(f"c{i}", {"i": i, "kind": k}) for i, k in enumerate(["ok", "broken", "flaky", "ok"])]
    out = tmp_path / "out"
    result = run_sweep(cells, fn, out, SweepOptions(max_retries=2, progress=False))
    assert result.failed == ["c1"] and set(result.records) == {"c0", "c2", "c3"}
    files = {f["key"]: f for f in load_cells(out)}
    assert files["c1"]["status"] == "failed" and files["c1"]["attempts"] == 3
    assert files["c1"]["errors"] == ["ValueError: cell 1 is broken"] * 3 and "Traceback" in files["c1"]["traceback"]
    assert files["c2"]["attempts"] == 2 and files["c2"]["errors"] == ["RuntimeError: transient"]
    # A failed cell is not finished: the next run tries it again (and only it).
    again = run_sweep(cells, fn, out, SweepOptions(max_retries=0, progress=False))
    assert again.skipped == ["c0", "c2", "c3"] and again.failed == ["c1"]


def test_output_directory_rules_and_raised_failures_write_nothing(tmp_path):
    """A directory kvpress-ext did not create is refused before any cell runs; with raise_failures a failing
    cell raises its own exception and leaves no cell file, no marker, no directory."""
    from kvpress_ext.storage.safe_write import RESULTS_MARKER, OutputPathError

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    ran = []
    with pytest.raises(OutputPathError, match="did not create"):
        run_sweep([Cell("a", {"x": 1})], lambda p: ran.append(p) or {}, theirs, SweepOptions(progress=False))
    assert ran == [] and sorted(p.name for p in theirs.iterdir()) == ["notes.txt"]

    def broken(params):
        raise ZeroDivisionError("cell is broken")

    with pytest.raises(ZeroDivisionError, match="cell is broken"):
        run_sweep([Cell("b", {})], broken, tmp_path / "new", SweepOptions(max_retries=1, progress=False),
                  raise_failures=True)
    assert not (tmp_path / "new").exists()
    result = run_sweep([Cell("c", {"x": 2})], _square, tmp_path / "new", SweepOptions(progress=False))
    assert result.records == {"c": {"y": 4}} and (tmp_path / "new" / RESULTS_MARKER).is_file()


def test_bad_keys_and_options():
    with pytest.raises(SweepError, match="filesystem-safe"):
        run_sweep([Cell("a/b", {})], _square, "/nonexistent", SweepOptions(progress=False))
    with pytest.raises(SweepError, match="Two cells"):
        run_sweep([Cell("a", {}), Cell("a", {})], _square, "/nonexistent", SweepOptions(progress=False))
    with pytest.raises(SweepError, match="--executor"):
        run_sweep([], _square, "/nonexistent", SweepOptions(executor="slurm"))
    assert cell_key("knorm", r=0.5) == "knorm_r=0.5" and cell_key("a b/c") == "a-b-c"


def test_missing_ray_is_one_line_exit_2(monkeypatch, capsys, tmp_path):
    from kvpress_ext.cli.perplexity import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    rc = main(["--model", str(MODEL), "--dataset", "text", "--text_file", str(TEXT), "--executor", "ray",
               "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and 'pip install "kvpress-ext[distributed]"' in err[0]
    assert not (tmp_path / "cells").exists()


def _config(out, executor):
    return PerplexityConfig(
        model=str(MODEL), dataset="text", text_file=str(TEXT), max_eval_tokens=160, context_limit=96, chunk_size=32,
        press=["knorm", "streaming_llm"], compression_ratio=[0.25, 0.5], ppl_apply_press=True, no_speed=True,
        threads=1, output_dir=str(out), no_progress=True, executor=executor, command="test",
    )


def _strip_timings(x):
    if isinstance(x, dict):
        return {k: _strip_timings(v) for k, v in x.items() if k not in TIMING_KEYS}
    if isinstance(x, list):
        return [_strip_timings(v) for v in x]
    return x


@pytest.mark.slow
def test_ray_perplexity_sweep_equals_local_and_resumes(ray_session, tmp_path, capsys):
    local = run(_config(tmp_path / "local", "local"))
    remote = run(_config(tmp_path / "ray", "ray"))
    assert len(local) == len(remote) == 5  # the baseline first, then press x ratio
    assert [r["press"]["name"] for r in local] == ["no_press", "knorm", "streaming_llm", "knorm", "streaming_llm"]
    assert len({r["perplexity"]["ppl"] for r in local}) == 5  # five different results, not one repeated
    for a, b in zip(local, remote):
        assert _strip_timings(a) == _strip_timings(b)  # exactly equal: same computation, one thread each
    ray_cells = load_cells(tmp_path / "ray")
    assert {c["executor"] for c in ray_cells} == {"ray"} and all(c["attempts"] == 1 for c in ray_cells)
    assert (tmp_path / "ray" / "summary.md").read_text().count("| knorm |") == 2
    # A second run finds every cell done and reuses the files, computing nothing.
    capsys.readouterr()
    again = run(_config(tmp_path / "ray", "ray"))
    assert capsys.readouterr().out.count("(done before)") == 5
    assert [_strip_timings(r) for r in again] == [_strip_timings(r) for r in remote]


@pytest.mark.slow
def test_ray_killed_worker_is_retried_and_the_sweep_completes(ray_session, tmp_path):
    marker_dir = tmp_path / "markers"
    marker_dir.mkdir()

    def fn(params):  # defined here: shipped to the workers by value
        marker = Path(params["markers"]) / params["name"]
        if params["die"] == "always" or (params["die"] == "once" and not marker.exists()):
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)  # the worker process dies mid-cell
        return {"name": params["name"], "pid": os.getpid()}

    cells = [Cell(n, {"name": n, "die": d, "markers": str(marker_dir)})
             for n, d in [("a", "no"), ("b", "once"), ("c", "always"), ("d", "no")]]
    result = run_sweep(cells, fn, tmp_path / "out", SweepOptions(executor="ray", max_retries=1, progress=False))
    assert set(result.records) == {"a", "b", "d"} and result.failed == ["c"]
    files = {f["key"]: f for f in load_cells(tmp_path / "out")}
    assert files["b"]["status"] == "ok" and files["b"]["attempts"] == 2
    assert files["c"]["status"] == "failed" and files["c"]["attempts"] == 2 and len(files["c"]["errors"]) == 2
    assert "Worker" in files["c"]["error"] or "died" in files["c"]["error"], files["c"]["error"]
    json.dumps(files)  # the cell files are plain JSON


@pytest.mark.slow
def test_failed_press_cell_is_recorded_and_summarised_from_cell_files(tmp_path):
    """kvcompose runs the model itself on a whole context, so under --ppl_apply_press its cell fails (kept with
    the reason) while knorm's and the baseline's run; the summary rebuilt from the cell files lists them. One failing
    press alone is its own one-line error instead, and writes nothing (its baseline would run after it)."""
    from kvpress_ext.core.errors import PressParameterError
    from kvpress_ext.evaluation import results

    config = _config(tmp_path, "local")
    config.press, config.compression_ratio, config.max_retries = ["knorm", "kvcompose"], [0.5], 0
    records = run(config)
    assert [(r["press"]["name"], r["status"]) for r in records] == [("no_press", "ok"), ("knorm", "ok"),
                                                                     ("kvcompose", "failed")]
    assert records[2]["error"].startswith("PressParameterError") and "runs the model itself" in records[2]["error"]
    (tmp_path / "summary.md").unlink()
    md, _ = results.summarize_directory(tmp_path)
    text = md.read_text()
    assert "| no_press | uncompressed |" in text and "| knorm | compression_ratio=0.5 |" in text
    assert "| kvcompose | compression_ratio=0.5 |" in text and "failed: PressParameterError" in text
    config.press, config.output_dir = ["kvcompose"], str(tmp_path / "single")
    with pytest.raises(PressParameterError, match="runs the model itself"):
        run(config)
    assert not (tmp_path / "single").exists()


@pytest.mark.slow
def test_press_all_probes_before_the_sweep_and_its_cells_record_why(tmp_path, capsys):
    """--press all: every registered press becomes a cell; the probe (_check_sweep) prints which cannot run in the
    mode before any cell line, and those cells record the probe's reason instead of running; no_press comes first."""
    from kvpress_ext.core.registry import available_presses

    config = _config(tmp_path, "local")
    config.press, config.compression_ratio, config.max_eval_tokens, config.context_limit = ["all"], [0.5], 128, 64
    records = run(config)
    out = capsys.readouterr().out
    assert {r["press"]["name"] for r in records} == set(available_presses()) and records[0]["press"]["name"] == "no_press"
    probe_at = out.index("presses run in this mode")
    assert probe_at < out.index("\nknorm ") and "Unsupported in this mode" in out[:out.index("\nknorm ")]
    cells = {c["key"]: c for c in load_cells(tmp_path)}
    assert cells["kvcompose_r=0.5"]["params"]["skip"].startswith("unsupported: ")
    kvcompose = next(r for r in records if r["press"]["name"] == "kvcompose")
    assert kvcompose["status"] == "unsupported" and "runs the model itself" in kvcompose["error"]
    knorm = next(r for r in records if r["press"]["name"] == "knorm")
    assert knorm["status"] == "ok" and knorm["kept"]["effective_ratio"] == pytest.approx(0.5)
    assert "| kvcompose |" in (tmp_path / "summary.md").read_text()
