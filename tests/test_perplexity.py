"""Perplexity evaluation: the loss against a direct computation, compression effects, the JSON record and the
command line's errors (run as a subprocess, exit status 2)."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvpress_ext.core.chunked_prefill import EveryChunkPress
from kvpress_ext.core.registry import get_press
from kvpress_ext.evaluation import perplexity as ppl
from kvpress_ext.testing import ARCHITECTURES, tiny_model

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KVPRESS_EXT_SHARED", REPO.parent / "shared"))
MODEL = SHARED / "models" / "stories260k"
TEXT = SHARED / "data" / "tinystories_val.txt"
SCRIPT = REPO / "evaluation" / "perplexity.py"


def _knorm_at_zero():
    """A press that removes nothing on purpose (the reference); its "compresses nothing" warning is expected."""
    from kvpress_ext.core.errors import NoCompressionWarning

    with pytest.warns(NoCompressionWarning):
        return get_press("knorm", compression_ratio=0.0)


@pytest.fixture(scope="module")
def stories():
    model = AutoModelForCausalLM.from_pretrained(MODEL, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    ids = ppl.tokenize(tokenizer, TEXT.read_text(), 512)
    return model, ids


def test_no_press_ppl_matches_direct_model_loss(stories):
    model, ids = stories
    assert ids.shape == (1, 512)
    with torch.no_grad():
        direct = float(model(input_ids=ids, labels=ids).loss)
    nll = ppl.teacher_forced_nll(model, ids, context_limit=4096)
    summary = ppl.perplexity_summary(nll, segment=128)
    assert summary["n_scored_tokens"] == 511
    assert summary["loss"] == pytest.approx(direct, rel=1e-4)
    assert summary["ppl"] == pytest.approx(3.71, abs=0.02)  # the value stated in shared/README.md (about 3.7)
    assert [c["end"] - c["start"] for c in summary["curve"]] == [128, 128, 128, 127]
    # The curve's token-weighted mean is the overall loss.
    weighted = sum(c["loss"] * (c["end"] - c["start"]) for c in summary["curve"]) / 511
    assert weighted == pytest.approx(summary["loss"], rel=1e-6)


def test_incremental_without_press_and_ratio_zero_equal_teacher_forced(stories):
    model, ids = stories
    reference = ppl.teacher_forced_nll(model, ids, context_limit=512)
    plain, stats = ppl.compressed_nll(model, ids, None, context_limit=512, chunk_size=100)
    torch.testing.assert_close(plain, reference, rtol=1e-4, atol=1e-4)
    assert stats["cache_len_end"] == 512
    zero, stats0 = ppl.compressed_nll(model, ids, _knorm_at_zero(), 512, chunk_size=100)
    torch.testing.assert_close(zero, reference, rtol=1e-4, atol=1e-4)
    assert stats0["cache_len_end"] == 512


def test_knorm_half_raises_ppl_and_keeps_half_of_seen_tokens(stories):
    model, ids = stories
    base = ppl.perplexity_summary(ppl.teacher_forced_nll(model, ids, 512))["ppl"]
    nll, stats = ppl.compressed_nll(model, ids, get_press("knorm", compression_ratio=0.5), 512, chunk_size=128)
    assert nll.numel() == 511
    assert ppl.perplexity_summary(nll)["ppl"] > base * 1.02
    assert stats["cache_len_end"] == 256 and stats["ratio_mode"].startswith("keep")
    # 5 layers x 4 kv heads x 8 dims x 4 bytes x (keys + values) per kept token.
    assert stats["cache_bytes_end"] == 256 * 5 * 4 * 8 * 4 * 2


def test_every_chunk_press_makes_prefill_press_compress_each_chunk(stories):
    model, ids = stories
    from transformers import DynamicCache

    from kvpress_ext.core.apply import apply_press

    wrapper = EveryChunkPress(press=get_press("snapkv", compression_ratio=0.25, window_size=16))
    cache, lengths = DynamicCache(), []
    with apply_press(wrapper, model):
        for s in range(0, 400, 100):
            model(input_ids=ids[:, s:s + 100], past_key_values=cache)
            lengths.append(cache.get_seq_length(0))
    assert lengths == [round(0.75 * n) for n in (100, 200, 300, 400)]
    # Without the wrapper kvpress compresses the first chunk only.
    cache, plain = DynamicCache(), []
    with apply_press(get_press("snapkv", compression_ratio=0.25, window_size=16), model):
        for s in range(0, 400, 100):
            model(input_ids=ids[:, s:s + 100], past_key_values=cache)
            plain.append(cache.get_seq_length(0))
    assert plain == [75, 175, 275, 375]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_pipeline_on_every_architecture(arch):
    model = tiny_model(arch)
    ids = torch.randint(4, 128, (1, 96), generator=torch.Generator().manual_seed(1))
    reference = ppl.teacher_forced_nll(model, ids, 96)
    zero, _ = ppl.compressed_nll(model, ids, _knorm_at_zero(), 96, chunk_size=32)
    torch.testing.assert_close(zero, reference, rtol=1e-4, atol=1e-4)
    half, stats = ppl.compressed_nll(model, ids, get_press("snapkv", compression_ratio=0.5, window_size=8), 96, 32)
    kept = 48 if arch != "gemma3" else (48 + 96) / 2  # Gemma 3: its sliding-window layer is not compressed
    assert stats["cache_len_end"] == kept and torch.isfinite(half).all()
    assert not torch.allclose(half, reference)


def _run(*args, out=None):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(SCRIPT), "--model", str(MODEL), "--no_progress", "--threads", "1", *args]
    if out is not None:
        cmd += ["--output_dir", str(out)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


@pytest.mark.slow
def test_command_line_json_and_errors(tmp_path):
    gpt2_dir = tmp_path / "gpt2"
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(gpt2_dir)
    text = ["--dataset", "text", "--text_file", str(TEXT)]
    procs = {
        "json": _run(*text, "--max_eval_tokens", "300", "--context_limit", "256", "--press", "knorm",
                     "--compression_ratio", "0.5", "--ppl_apply_press", "--max_new_tokens", "4", "--num_runs", "1",
                     "--segment", "100", out=tmp_path / "out"),
        "unknown": _run(*text, "--press", "knrom"),
        "missing": _run("--dataset", "text", "--text_file", str(tmp_path / "nope.txt")),
        "ratio": _run(*text, "--press", "knorm", "--compression_ratio", "1.5"),
        "param": _run(*text, "--press", "knorm", "--press_kwargs", "window_size=4"),
        "model": _run(*text, "--model", str(gpt2_dir)),
    }
    done = {k: (p.communicate(timeout=300), p.returncode) for k, p in procs.items()}
    expected = {
        "unknown": "Unknown press 'knrom'. Did you mean: knorm",
        "missing": "Text file not found",
        "ratio": "out of range; it must be in [0, 1)",
        "param": "has no parameter 'window_size'",
        "model": "No kvpress_ext adapter for model_type 'gpt2'",
    }
    for key, needle in expected.items():
        (_stdout, stderr), rc = done[key]
        assert rc == 2, (key, stderr)
        lines = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and needle in lines[0], (key, stderr)
        assert "Traceback" not in stderr
    (stdout, stderr), rc = done["json"]
    assert rc == 0, stderr
    files = sorted((tmp_path / "out").glob("*.json"))  # the press and, beside it, the uncompressed baseline
    assert len(files) == 2 and "no_press" in files[1].name, files
    baseline = json.loads(files[1].read_text())
    record = json.loads(files[0].read_text())
    # The table: baseline first, the press's setting (never ratio=None), units, threads, where the JSON went.
    lines = stdout.splitlines()
    row = {line.split()[0]: line for line in lines if line.startswith(("no_press", "knorm"))}
    assert list(row) == ["no_press", "knorm"] and "(baseline)" in row["no_press"], stdout
    assert "compression_ratio=0.5" in row["knorm"] and "None" not in stdout
    ppl_change = (record["perplexity"]["ppl"] / baseline["perplexity"]["ppl"] - 1) * 100
    assert f"({ppl_change:+.2f} %)" in row["knorm"]
    assert "22/44 (ratio 0.50)" in row["knorm"] and "44/44 (ratio 0.00)" in row["no_press"]
    assert " MiB (50 %)" in row["knorm"] and " MiB (100 %)" in row["no_press"]
    assert "tok/s" in row["knorm"] and " ms" in row["knorm"]
    assert "Timed on 1 CPU thread; load average" in stdout
    assert f"JSON in {tmp_path / 'out'}:" in stdout and files[0].name in stdout and files[1].name in stdout
    assert record["kept"]["effective_ratio"] == pytest.approx(0.5) and baseline["kept"]["effective_ratio"] == 0
    assert record["environment"]["threads"] == 1 and "loadavg_1m" in record["environment"]["load_start"]
    for key in ("model", "data", "press", "settings", "perplexity", "speed", "cache", "memory", "versions",
                "environment", "git_commit", "command"):
        assert key in record, key
    assert record["press"]["name"] == "knorm" and record["press"]["compression_ratio"] == 0.5
    assert record["press"]["params"]["compression_ratio"] == 0.5
    assert record["data"]["n_tokens"] == 300
    p = record["perplexity"]
    assert p["n_scored_tokens"] == 255 + 43 and p["press_applied"] is True
    assert math.isclose(p["ppl"], math.exp(p["loss"]), rel_tol=1e-9) and len(p["curve"]) == 3
    assert record["cache"]["cache_len_end"] == 22  # last window: 44 tokens, half kept
    s = record["speed"]
    for key in ("ttft_s", "decode_tok_per_s", "cache_bytes_after_prefill", "cache_bytes_end", "peak_memory_bytes"):
        assert s[key] is not None and s[key] > 0, key
    assert s["cache_bytes_after_prefill"] == 128 * 5 * 4 * 8 * 4 * 2  # 256-token prefill, half kept
    assert record["memory"]["peak_memory_bytes"] > 0
    assert record["versions"]["torch"] == torch.__version__


@pytest.mark.slow
def test_budget_presses_follow_the_compression_ratio_in_sweeps(stories):
    """lazy_streaming and rkv have a token budget, not a ratio: a sweep sizes them to keep 1 - ratio of a
    context window, so they are compared with ratio-based presses at one memory budget; an explicit budget wins."""
    from kvpress_ext.evaluation.press_setup import build_press, sweep_jobs

    lazy, ratio = build_press("lazy_streaming", 0.5, {}, 512)
    assert ratio == 0.5 and lazy.max_cache == 256 and lazy.slack == 32
    assert build_press("rkv", 0.75, {}, 512)[0].budget == 128
    explicit, ratio = build_press("lazy_streaming", 0.5, {"cap_total": 100, "slack": 10}, 512)
    assert explicit.max_cache == 100 and ratio is None
    jobs = {name: (press, skip) for name, press, _, skip in sweep_jobs(0.25, 512)}
    assert jobs["lazy_streaming"][1] is None and jobs["lazy_streaming"][0].max_cache == 384
    # Sized this way, the cache it leaves after a 512-token window stays within the budget.
    model, ids = stories
    nll, stats = ppl.compressed_nll(model, ids, lazy, context_limit=512, chunk_size=64)
    assert nll.numel() == 511 and stats["cache_len_end"] <= 256


@pytest.mark.slow
def test_sweep_summary_table_and_plots(tmp_path):
    """summary.md lists every run (failures with their reason); one run per press gives the ranked plot; the
    cross-ratio table and plot read the sweep directories back."""
    from kvpress_ext.evaluation import results

    def record(name, ratio, ppl_value, status="ok"):
        r = {"press": {"name": name, "compression_ratio": ratio, "params": {}}, "status": status,
             "data": {"dataset": "text"}}
        if status == "ok":
            r.update(perplexity={"ppl": ppl_value, "loss": math.log(ppl_value)},
                     cache={"cache_bytes_end": int(1000 * (1 - (ratio or 0)))}, speed={"decode_tok_per_s": 100.0})
        else:
            r["error"] = "ValueError: broken"
        return r

    dirs = {}
    for ratio in (0.25, 0.5):
        d = tmp_path / f"r{ratio}"
        recs = [record("no_press", None, 4.0), record("knorm", ratio, 4.0 + ratio), record("bad", ratio, 0, "failed")]
        for r in recs:
            results.write_json(r, d)
        md, png = results.write_summary(recs, d)
        text = md.read_text()
        assert "| knorm | " in text and "failed: ValueError: broken" in text
        assert png is not None and png.stat().st_size > 0
        dirs[ratio] = d
    table = results.ratio_table(dirs)
    assert "| knorm | 4.2500 | 4.5000 |" in table and "- `bad`: failed" in table
    out = results.plot_ratio_sweeps(dirs, tmp_path / "ratios.png")
    assert out.stat().st_size > 0


@pytest.mark.slow
def test_sweep_lists_presses_that_cannot_run_in_the_mode_before_it_starts(stories, tmp_path):
    """In --ppl_apply_press mode, a prefill-only press (leverage_score: asserts on a second chunk) and a press that
    runs the model itself (kvcompose) are found unsupported by a short probe, with their own reason; presses that
    work there are not; the probe leaves the press as it was."""
    from kvpress_ext.evaluation.runners.perplexity import PerplexityConfig
    from kvpress_ext.evaluation.runners.perplexity_checks import probe_support

    model, ids = stories
    args = PerplexityConfig(command="", context_limit=256, chunk_size=64, ppl_apply_press=True, max_new_tokens=4,
                            num_runs=1, output_dir=str(tmp_path))
    assert probe_support(model, ids, get_press("knorm"), args) is None
    assert probe_support(model, ids, get_press("lazy_streaming", cap_total=64, slack=8), args) is None
    reason = probe_support(model, ids, get_press("leverage_score"), args)
    assert reason and "only supports prefill" in reason and "with --no_ppl_press" in reason, reason
    reason = probe_support(model, ids, get_press("kvcompose"), args)
    assert reason and "runs the model itself" in reason, reason
    # The same presses run when perplexity is taken without the press (only the speed run uses it).
    plain = PerplexityConfig(command="", context_limit=256, max_new_tokens=4, num_runs=1, ppl_apply_press=False)
    assert probe_support(model, ids, get_press("leverage_score"), plain) is None


@pytest.mark.slow
def test_sweep_summary_explains_columns_and_marks_presses_that_did_not_compress(tmp_path):
    from kvpress_ext.evaluation import results

    def record(name, kv, ppl_value=4.0, status="ok", setting="compression_ratio=0.5"):
        r = {"press": {"name": name, "compression_ratio": 0.5, "setting": setting, "params": {}}, "status": status,
             "data": {"dataset": "text"}}
        if status == "ok":
            r.update(perplexity={"ppl": ppl_value, "loss": math.log(ppl_value)},
                     cache={"cache_bytes_end": kv, "cache_len_end": kv // 100}, speed={"decode_tok_per_s": 10.0})
        else:
            r["error"] = "ValueError: broken"
        return r

    recs = [record("no_press", 1000, setting="uncompressed"), record("knorm", 500, 4.4),
            record("idle", 1000, 4.0), record("bad", 0, status="unsupported")]
    md, png = results.write_summary(recs, tmp_path)
    text = md.read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "*did not compress*" in rows["idle"] and "*did not compress*" not in rows["knorm"]
    assert "*did not compress*" not in rows["no_press"]
    assert "+10.00 %" in rows["knorm"] and "(ratio 0.50)" in rows["knorm"] and "(50 %)" in rows["knorm"]
    for column in ("press", "setting", "ppl", "Δ ppl", "kept", "KV", "decode", "TTFT", "status"):
        assert f"- **{column}**: " in text, column
    assert "unsupported: ValueError: broken" in rows["bad"]
    assert png is not None and png.stat().st_size > 0
    assert "bad (unsupported)" in results._not_run_text(results.summary_rows(recs))


def test_line_styles_are_distinct_for_many_lines():
    from kvpress_ext.evaluation.results import line_style

    styles = [line_style(i) for i in range(60)]
    assert len(set(styles)) == 60
    assert all(a[0] != b[0] and a[1] != b[1] for a, b in itertools.pairwise(styles))
