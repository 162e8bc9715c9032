"""evaluation/streaming_quality.py (issue 11, part 2d): the four methods and the report on a text file or folder,
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
    files = script.text_files(str(folder))
    assert [f.name for f in files] == ["a.txt", "b.txt"]
    assert script.text_label(files) == "a.txt + 1 more (texts)"


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
