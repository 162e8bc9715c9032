"""Long-context reports over the cells of several models (e.g. SmolLM2's grid and Gemma 3's): every model gets its
own columns, and a press is judged against its own model's no press, never another's."""

from __future__ import annotations

from kvpress_ext.cli.longcontext import needle_main
from kvpress_ext.evaluation.reports.longcontext import safe_ratios, summarize, summary_markdown
from kvpress_ext.evaluation.runners.longcontext import run_cells
from kvpress_ext.evaluation.sweep import Cell, SweepOptions

SMOL, GEMMA = "/work/smollm2-135m", "gemma3-270m"
#: (model, length, method, ratio, scores over two depths). At 1,024 tokens both models ran: pooled, snapkv would
#: score 3 / 4 against no press's 4 / 4 (not safe); per model it is unsafe on SmolLM2 and safe on Gemma 3.
GRID = [(SMOL, 1024, "no_press", 0.0, (1.0, 1.0)), (SMOL, 1024, "snapkv", 0.5, (1.0, 0.0)),
        (GEMMA, 1024, "no_press", 0.0, (1.0, 1.0)), (GEMMA, 1024, "snapkv", 0.5, (1.0, 1.0)),
        (GEMMA, 8192, "no_press", 0.0, (1.0, 0.0)), (GEMMA, 8192, "snapkv", 0.5, (1.0, 0.0))]
DEPTHS = (0.1, 0.5)


def records(model=None):
    return [{"key": f"{m}|{method}|{n}|{d}", "model": m, "method": method, "compression_ratio": ratio, "rate": None,
             "query_aware": True, "length": n, "depth": d, "key_index": 0, "score": s, "ttft_s": 1.0,
             "status": "ok"}
            for m, n, method, ratio, scores in GRID if model in (None, m) for d, s in zip(DEPTHS, scores)]


def test_safe_ratio_is_judged_per_model():
    safe = {(s["model"], s["length"]): s["safe_ratio"] for s in safe_ratios(records())}
    assert safe == {(SMOL, 1024): None, (GEMMA, 1024): 0.5, (GEMMA, 8192): 0.5}


def test_each_model_gets_its_own_columns():
    md = summary_markdown(records(), "needle")
    header = "| smollm2-135m 1024 aware | gemma3-270m 1024 aware | gemma3-270m 8192 aware |"
    assert f"| press {header}" in md and f"| press | ratio {header}" in md
    assert "| (no press accuracy) | 1.00 (2) | 1.00 (2) | 0.50 (2) |" in md
    assert "| snapkv | none | 0.50 | 0.50 |" in md
    assert "| snapkv | 0.5 | 0.50 (1/2, 0.09-0.91) | 1.00 (2/2, 0.34-1.00) | 0.50 (1/2, 0.09-0.91) |" in md
    assert {(s["model"], s["length"]) for s in summarize(records()) if s["method"] == "snapkv"} == {
        (SMOL, 1024), (GEMMA, 1024), (GEMMA, 8192)}


def test_one_model_keeps_the_plain_header():
    md = summary_markdown(records(GEMMA), "needle")
    assert "| press | 1024 aware | 8192 aware |" in md and "gemma3-270m 1024" not in md


def _grid_folder(path, model):
    """A grid's output folder written by the runner's own sweep (one cell file per record; the score to record
    rides in a bookkeeping parameter)."""
    cells = [Cell(f"{r['method']}__{r['length']}__{r['depth']}",
                  {**{k: v for k, v in r.items() if k not in ("key", "score", "ttft_s", "status")}, "_score": r["score"]})
             for r in records(model)]
    run_cells(cells, lambda p: {"score": p["_score"], "ttft_s": 1.0}, path, options=SweepOptions(progress=False))
    return str(path)


def test_summary_from_joins_the_folders_of_two_models(tmp_path, capsys):
    smol, gemma = _grid_folder(tmp_path / "smol", SMOL), _grid_folder(tmp_path / "gemma", GEMMA)
    out = tmp_path / "both"
    assert needle_main(["--summary_from", smol, gemma, "--output_dir", str(out)]) == 0
    md = (out / "summary.md").read_text()
    assert "| snapkv | none | 0.50 | 0.50 |" in md
    assert "| snapkv | 0.5 | 0.50 (1/2, 0.09-0.91) | 1.00 (2/2, 0.34-1.00) | 0.50 (1/2, 0.09-0.91) | reused " in md  # every cell from the grids' folders
    assert (out / "summary.json").is_file() and (out / "heatmap_aware.png").is_file()


def test_summary_from_bad_folders_is_one_line_and_writes_nothing(tmp_path, capsys):
    smol = _grid_folder(tmp_path / "smol", SMOL)
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    for argv in (["--summary_from", smol, str(empty), "--output_dir", str(out)],
                 ["--summary_from", smol, "--output_dir", smol],
                 ["--summary_from", smol]):
        capsys.readouterr()
        assert needle_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--output_dir" in err
    assert not out.exists() and not (tmp_path / "smol" / "summary.md").exists()
