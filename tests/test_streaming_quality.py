"""evaluation/streaming_quality.py: the four methods and the report on a text file or folder,
per-segment perplexity, and bad input as one line with exit status 2."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KVPRESS_EXT_SHARED", REPO.parent / "shared"))
MODEL = SHARED / "models" / "stories260k"


@pytest.fixture(scope="module")
def script():
    if not MODEL.is_dir():
        pytest.skip("stories260k not found (set KVPRESS_EXT_SHARED)")
    spec = importlib.util.spec_from_file_location("streaming_quality", REPO / "evaluation" / "streaming_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_methods_and_report_on_the_default_text(script, tmp_path, capsys):
    common = ["--model", str(MODEL), "--device", "cpu", "--threads", "1", "--tokens", "400", "--cap_total", "96",
              "--slack", "16", "--out_dir", str(tmp_path / "runs")]
    for method in ("dense", "reference", "eager", "lazy"):
        script.main([*common, "--method", method, "--reference_stride", "4", "--batch", "32"])
    script.main([*common, "--report", "--segment", "64", "--json", str(tmp_path / "r.json"),
                 "--plot", str(tmp_path / "r.png")])
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["text"].startswith("pride_and_prejudice.txt + ")  # the default: the novel, then the essays
    assert result["predictions"] == {m: 400 for m in ("dense", "reference", "eager", "lazy")}
    curves = result["segment_ppl_all_targets"]
    assert all(len(v) == 7 for v in curves.values())  # ceil(400 / 64) segments
    # before the cap every method computes the same thing
    assert curves["lazy"][0] == pytest.approx(curves["dense"][0], rel=1e-4)
    assert curves["reference"][0] == pytest.approx(curves["dense"][0], rel=1e-4)
    assert curves["eager"][0] == pytest.approx(curves["dense"][0], rel=1e-4)
    assert curves["dense"][-1] != pytest.approx(curves["lazy"][-1], rel=1e-3)  # past the cap they differ
    assert all(math.isfinite(x) and x > 1 for v in curves.values() for x in v)
    assert result["settings"]["reference"]["stride"] == 4
    assert (tmp_path / "r.png").stat().st_size > 0
    assert "wrote" in capsys.readouterr().out


def test_text_file_folder_is_joined(script, tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "b.txt").write_text("second file " * 50)
    (folder / "a.txt").write_text("first file " * 50)
    from kvpress_ext.evaluation.runners.streaming import text_files, text_label

    files = text_files(str(folder))
    assert [f.name for f in files] == ["a.txt", "b.txt"]
    assert text_label(files) == "a.txt + 1 more (texts)"


@pytest.mark.slow
@pytest.mark.parametrize("args, words", [
    (["--method", "lazy", "--text_file", "/nonexistent/text.txt"], "does not exist"),
    (["--method", "lazy", "--tokens", "100000000"], "fewer than --tokens"),
    (["--report"], "no saved run"),
])
def test_bad_input_is_one_line_and_exit_2(script, args, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--model", str(MODEL), "--device", "cpu", "--out_dir", str(tmp_path / "none"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and words in err[0], err


@pytest.mark.slow
def test_max_seconds_saves_a_prefix_that_the_report_compares(script, tmp_path, capsys):
    """A run stopped by --max_seconds keeps the predictions made so far (a prefix equal to the full run's), says
    so, and the report compares methods on the tokens they share."""
    common = ["--model", str(MODEL), "--device", "cpu", "--threads", "1", "--tokens", "300", "--cap_total", "64",
              "--slack", "8", "--reference_stride", "2", "--batch", "8"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    for method in ("reference", "eager"):
        script.main([*common, "--out_dir", full, "--method", method])
        script.main([*common, "--out_dir", cut, "--method", method, "--max_seconds", "1e-9"])
    assert "stopped by --max_seconds, 300 asked" in capsys.readouterr().out
    import torch

    for method, expected in (("reference", 64), ("eager", 65)):  # the first window / the first chunk (cap + 1)
        whole = torch.load(Path(full) / f"{method}.pt", weights_only=True)
        part = torch.load(Path(cut) / f"{method}.pt", weights_only=True)
        assert not whole["args"]["stopped_early"] and part["args"]["stopped_early"]
        assert len(whole["nlls"]) == 300 and len(part["nlls"]) == expected
        assert torch.equal(part["nlls"], whole["nlls"][:expected])
    script.main([*common, "--out_dir", cut, "--method", "lazy"])
    script.main([*common, "--out_dir", cut, "--report", "--segment", "32", "--json", str(tmp_path / "r.json"),
                 "--plot", str(tmp_path / "r.png")])
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["stopped_early"] == ["eager", "reference"]
    assert result["predictions"] == {"reference": 64, "eager": 65, "lazy": 300}
    assert result["checks"]["lazy_vs_eager_tokens"] == 65 and result["checks"]["lazy_vs_reference_tokens"] == 64


def test_library_deadline_stops_between_batches(monkeypatch):
    """``deadline`` in the library: the reference returns up to the last target of the last finished batch."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvpress_ext.evaluation.streaming import recompute_reference_nlls

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    ids = torch.randint(0, 50, (41,))
    calls = iter([0.0, 0.0, 10.0])  # the first two batches run, the third is past the deadline
    monkeypatch.setattr("kvpress_ext.evaluation.streaming.time.monotonic", lambda: next(calls))
    part = recompute_reference_nlls(model, ids, total=8, batch=4, stride=3, deadline=5.0)
    monkeypatch.undo()
    whole = recompute_reference_nlls(model, ids, total=8, batch=4, stride=3)
    # targets 8, 11, ..., 29 in the first two batches: the prefix ends at target 29
    assert len(part) == 30 and torch.equal(part.isnan(), whole[:30].isnan())
    assert torch.allclose(part[~part.isnan()], whole[:30][~part.isnan()])
