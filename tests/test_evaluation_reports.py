"""What the evaluation reports tell a reader: the perplexity table's header, rows equal to the baseline with the
reason, results reused from an earlier run with their date; one results folder per model; the one model cache."""

from __future__ import annotations

from types import SimpleNamespace

from kvpress_ext.evaluation import model_cache
from kvpress_ext.evaluation.reports.longcontext import summary_markdown
from kvpress_ext.evaluation.reports.perplexity_table import format_line, format_table, header_line
from kvpress_ext.evaluation.runners.perplexity import PerplexityConfig, default_output_dir


def _record(name, ppl, applied=True, compressed=True, path=None):
    kept = {"cache_len": 256 if compressed else 512, "tokens": 512, "kv_bytes": 50 if compressed else 100,
            "kv_bytes_uncompressed": 100, "kv_fraction": 0.5 if compressed else 1.0,
            "effective_ratio": 0.5 if compressed else 0.0, "compressed": compressed, "measured_by": "speed run"}
    return {"press": {"name": name, "setting": "-"}, "status": "ok", "kept": kept,
            "perplexity": {"ppl": ppl, "press_applied": applied, "n_scored_tokens": 1022},
            "settings": {"ppl_apply_press": applied}, "data": {"context_limit": 512},
            "json_path": path or f"results/perplexity/m/{name}.json"}


def test_header_names_model_text_lengths_and_whether_the_press_acted():
    args = PerplexityConfig(command="", model="smollm2-135m", max_eval_tokens=1024, context_limit=512, chunk_size=128)
    line = header_line(args, "/data/wikitext2_test.raw")
    assert line == ("model smollm2-135m; text wikitext2_test.raw (first 1024 tokens, windows of 512); perplexity under "
                    "the press (text fed in chunks of 128 tokens)")
    plain = header_line(SimpleNamespace(**{**vars(args), "ppl_apply_press": False}), "/data/wikitext2_test.raw")
    assert "perplexity without the press (--no_ppl_press" in plain


def test_rows_equal_to_the_baseline_say_why():
    base = _record("no_press", 26.8149, compressed=False)
    assert "same as baseline: the press was not applied" in format_line(_record("knorm", 26.8149, applied=False), base)
    assert "same as baseline: the press removed nothing" in format_line(_record("decoding", 26.8149, compressed=False),
                                                                        base)
    assert "same as baseline" not in format_line(_record("knorm", 30.3261), base)
    assert "(+13.09 %)" in format_line(_record("knorm", 30.3261), base)


def test_reused_rows_carry_the_date_they_were_measured():
    base, press = _record("no_press", 4.0, compressed=False), _record("knorm", 4.4)
    table = format_table([base, press], "model m; text t", reused={press["json_path"]: "2026-12-01"})
    lines = table.splitlines()
    assert lines[0] == "model m; text t"
    row = next(line for line in lines if line.startswith("knorm"))
    assert "(done before) [measured 2026-12-01]" in row
    assert "measured" not in next(line for line in lines if line.startswith("no_press"))
    assert "an earlier run with the same settings" in table
    assert "(done before) [measured 2026-12-01]" in format_line(press, base, reused="2026-12-01")


def test_each_model_gets_its_own_results_folder_by_default():
    assert default_output_dir("smollm2-135m") == "results/perplexity/smollm2-135m"
    assert default_output_dir("../shared/models/stories260k") == "results/perplexity/stories260k"
    assert PerplexityConfig(command="").output_dir is None  # resolved per model when the run starts
    assert PerplexityConfig(command="").ppl_apply_press  # the main job measures perplexity under the press


def test_needle_summary_lists_reused_dates_and_skips_empty_press_tables():
    def rec(key, method, score, measured):
        return {"key": key, "method": method, "compression_ratio": 0.0, "rate": None, "query_aware": False,
                "length": 128, "depth": 0.0, "score": score, "status": "ok", "measured": measured}

    records = [rec("a", "no_press", 1.0, "2026-12-01"), rec("b", "no_press", 1.0, "2026-12-07")]
    md = summary_markdown(records, "needle: m", reused={"a"})
    assert "1 reused from an earlier run" in md and "partly reused 2026-12-01" in md
    assert "## Needle kept" not in md and "## Misses explained" not in md  # no press compressed anything
    assert "this run" in summary_markdown(records, "needle: m")


def test_the_model_cache_loads_once_and_keeps_the_two_latest(monkeypatch):
    loads = []
    monkeypatch.setattr(model_cache, "load_model", lambda name, **kw: loads.append((name, kw)) or (name, "tok"))
    monkeypatch.setattr(model_cache, "_MODELS", type(model_cache._MODELS)())
    monkeypatch.setattr(model_cache, "_EXTRAS", {})
    assert model_cache.get_model("a", device=None) == ("a", "tok")
    assert model_cache.get_model("a") == ("a", "tok") and loads == [("a", {})]  # None options are the defaults
    model_cache.get_model("b", dtype="float32")
    model_cache.get_model("c")
    model_cache.get_model("a")  # dropped when c came in: loaded again
    assert [name for name, _ in loads] == ["a", "b", "c", "a"]
    sizes = []
    assert model_cache.model_extra("a", "size", lambda m: sizes.append(m) or 7) == 7
    assert model_cache.model_extra("a", "size", lambda m: sizes.append(m) or 8) == 7 and sizes == ["a"]
    model_cache.preload_model("tiny", "tiny-model", "tiny-tok")
    assert model_cache.get_model("tiny") == ("tiny-model", "tiny-tok") and loads[-1][0] == "a"
