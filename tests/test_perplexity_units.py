"""The perplexity evaluation's building blocks, one at a time: text loading (local file, and the hub datasets
through a stand-in for ``datasets.load_dataset``: no network here), tokenizing a prefix, windows, cache
accounting, how each kind of press is driven, curves and messages."""

from __future__ import annotations

import math
import types
import zlib

import datasets
import kvpress
import pytest
import torch
from transformers import DynamicCache

import kvpress_ext
from kvpress_ext.core.apply import cache_length_hook
from kvpress_ext.core.chunked_prefill import EveryChunkPress
from kvpress_ext.core.contract import PressContract
from kvpress_ext.core.errors import KVPressExtError, PressParameterError, UnsupportedModelError
from kvpress_ext.core.positions import cache_length
from kvpress_ext.evaluation import perplexity as ppl
from kvpress_ext.presses.lazy_streaming import LazyStreamingPress
from kvpress_ext.presses.rkv import RKVPress
from kvpress_ext.storage.inputs import shared_dir
from kvpress_ext.testing import tiny_model


def _message(exc_type, fn, *args, **kwargs) -> str:
    with pytest.raises(exc_type) as err:
        fn(*args, **kwargs)
    return str(err.value)


# --- loading --------------------------------------------------------------------------------------------------
def test_load_local_text_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("café ✓\nzwei".encode())
    assert ppl.load_text("text", text_file=str(path)) == "café ✓\nzwei"
    assert ppl.load_text("text") == ppl.load_text("text", text_file=str(ppl.default_text_file()))  # the default text
    assert _message(KVPressExtError, ppl.load_text, "text", text_file=str(tmp_path / "no.txt")) == (
        f"Text file not found: {str(tmp_path / 'no.txt')!r}. Pass an existing file with --text_file.")
    assert _message(KVPressExtError, ppl.load_text, "c4") == (
        "Unknown dataset 'c4'; choose one of text, wikitext, pg19.")


@pytest.fixture
def hub(monkeypatch):
    """A stand-in for datasets.load_dataset that records what was asked for."""
    calls = []

    def load_dataset(name, *args, **kwargs):
        calls.append((name, args, kwargs))
        if name == "wikitext":
            return {"text": [" = Title =\n", "line one\n", "line two\n"]}
        if name == "deepmind/pg19":
            return iter([{"text": f"book {i}"} for i in range(3)])
        raise ConnectionError("no network here\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_load_hub_datasets(hub):
    assert ppl.load_text("wikitext") == " = Title =\nline one\nline two\n"  # the split joined as it is
    assert ppl.load_text("wikitext", subset="wikitext-103-raw-v1", split="validation").startswith(" = Title")
    assert ppl.load_text("pg19", sample_idx=2) == "book 2"
    assert ppl.load_text("pg19") == "book 0"  # the first book by default
    assert hub == [
        ("wikitext", ("wikitext-2-raw-v1",), {"split": "test"}),
        ("wikitext", ("wikitext-103-raw-v1",), {"split": "validation"}),
        ("deepmind/pg19", (), {"split": "test", "streaming": True}),
        ("deepmind/pg19", (), {"split": "test", "streaming": True}),
    ]
    assert _message(KVPressExtError, ppl.load_text, "pg19", sample_idx=5) == (
        "PG-19 split 'test' has no book at --sample_idx 5.")


def test_load_hub_dataset_offline(monkeypatch):
    first_line = "no network here " + "x" * 300

    def offline(*args, **kwargs):
        raise ConnectionError(first_line + "\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    fix = "Use --dataset text --text_file PATH (a local UTF-8 file)."
    monkeypatch.setattr(ppl.hub, "use_cache_only_if_offline", lambda: None)  # online, the load itself fails
    assert _message(KVPressExtError, ppl.load_text, "wikitext") == (  # the error's first line, 200 characters
        f"Could not load dataset 'wikitext' (ConnectionError: {first_line[:200]}). {fix}")
    monkeypatch.setattr(ppl.hub, "use_cache_only_if_offline", lambda: "HF_HUB_OFFLINE=1 is set")
    assert _message(KVPressExtError, ppl.load_text, "wikitext") == (
        "Could not load dataset 'wikitext' (the Hugging Face hub cannot be used (HF_HUB_OFFLINE=1 is set) and it "
        f"is not in the local cache). {fix}")


def test_shared_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("KVPRESS_EXT_SHARED", str(tmp_path))
    assert shared_dir() == tmp_path
    monkeypatch.delenv("KVPRESS_EXT_SHARED")
    from pathlib import Path

    assert shared_dir() == Path(kvpress_ext.__file__).resolve().parents[1].parent / "shared"


# --- tokens and windows -----------------------------------------------------------------------------------------
class WordTokenizer:
    """One token per space-separated word (ids from the word), like a tokenizer whose tokens span many
    characters; a word cut by a prefix becomes another token, as with a real tokenizer."""

    def __call__(self, text, return_tensors=None):
        ids = [zlib.crc32(w.encode()) % 1000 for w in text.split(" ") if w]
        return types.SimpleNamespace(input_ids=torch.tensor([ids]) if return_tensors == "pt" else ids)


def test_tokenize_a_prefix_equals_cutting_the_whole_text():
    tok = WordTokenizer()
    words = [f"w{i:015d}" for i in range(40)]  # 16-character words + a space: 17 characters per token
    text = " ".join(words)
    full = tok(text, return_tensors="pt").input_ids
    assert torch.equal(ppl.tokenize(tok, text), full)
    for n in (2, 4, 9, 39, 40, 100):
        assert torch.equal(ppl.tokenize(tok, text, max_tokens=n), full[:, :n])
    assert _message(KVPressExtError, ppl.tokenize, tok, "alone") == (
        "The text has 1 token(s); perplexity needs at least 2.")
    assert ppl.tokenize(tok, "just two").shape == (1, 2)


def test_windows():
    assert ppl.windows(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert ppl.windows(9, 4) == [(0, 4), (4, 8)]  # a last window of one token predicts nothing
    assert ppl.windows(5, 2) == [(0, 2), (2, 4)]
    assert ppl.windows(1, 4) == []
    assert _message(KVPressExtError, ppl.windows, 10, 1) == "--context_limit must be at least 2, got 1."


# --- caches and plans -------------------------------------------------------------------------------------------
def test_cache_accounting():
    assert ppl.cache_bytes(None) == 0 and ppl.cache_bytes(object()) == 0
    assert cache_length(DynamicCache()) == 0
    quantized = types.SimpleNamespace(layers=[types.SimpleNamespace(
        keys=torch.zeros(1, 2, 3, 4), values=None, _quantized_keys=torch.zeros(5, dtype=torch.uint8),
        _quantized_values=torch.zeros(7, dtype=torch.uint8))])
    assert ppl.cache_bytes(quantized) == 24 * 4 + 5 + 7


def test_plans_for_each_kind_of_press():
    assert ppl.plan_for(None) == ppl.CompressionPlan(None, None, False, False, "none")
    rkv = RKVPress(budget=16, window_size=4)
    assert ppl.plan_for(rkv) == ppl.CompressionPlan(rkv, rkv, True, True, "press's own decoding rule", [])
    decoding = kvpress.DecodingPress(base_press=kvpress.KnormPress())
    assert ppl.plan_for(decoding) == ppl.CompressionPlan(decoding, decoding, False, True,
                                                         "press's own decoding rule", [])
    knorm = kvpress.KnormPress(compression_ratio=0.5)
    plan = ppl.plan_for(knorm)
    assert (plan.press, plan.prefill, plan.decoding, plan.extra_hooks) == (knorm, True, False, [])
    assert isinstance(plan.hooked, EveryChunkPress) and plan.hooked.press.press is knorm  # in TemporalOrderPress
    assert plan.ratio_mode == plan.hooked.ratio_mode
    rerotating = kvpress.KeyRerotationPress(press=knorm)
    assert ppl.plan_for(rerotating).extra_hooks == [cache_length_hook]  # next position = cache length

    class RerotatingDecoder(kvpress.KeyRerotationPress):  # re-rotates and compresses while decoding
        contract = PressContract(prefill=True, decoding=True, positions_follow_cache=True)

    both = RerotatingDecoder(press=knorm)
    assert ppl.plan_for(both).extra_hooks == [cache_length_hook] and ppl.plan_for(both).hooked is both
    lazy = LazyStreamingPress(window=8, slack=2)
    assert ppl.plan_for(lazy).extra_hooks == [] and ppl.plan_for(lazy).decoding

    class SelfDriving:
        def __call__(self, model):
            pass

    assert _message(PressParameterError, ppl.plan_for, SelfDriving()) == (
        "SelfDriving runs the model itself on a whole context, so it cannot compress a text that grows chunk by "
        "chunk; evaluate it with --no_ppl_press.")


def test_summary_curve_and_default_segment():
    nll = torch.cat([torch.full((512,), 1.0), torch.full((88,), 2.0)])
    summary = ppl.perplexity_summary(nll)
    assert summary["n_scored_tokens"] == 600
    assert summary["loss"] == pytest.approx((512 + 176) / 600)
    assert summary["ppl"] == pytest.approx(math.exp(summary["loss"]))
    assert summary["curve"] == [
        {"start": 0, "end": 512, "loss": 1.0, "ppl": math.e},
        {"start": 512, "end": 600, "loss": 2.0, "ppl": math.exp(2.0)},
    ]
    assert [c["end"] for c in ppl.segment_curve(nll)] == [512, 600]


def test_unsupported_model_message_is_one_sentence():
    class Bloom(torch.nn.Module):
        config = types.SimpleNamespace(model_type="bloom")

    assert _message(UnsupportedModelError, ppl.check_supported, Bloom()) == (
        "No kvpress_ext adapter for model_type 'bloom' (Bloom). Supported: gemma3_text, gpt_neox, llama, mistral, qwen2, qwen3.")
    ppl.check_supported(tiny_model("llama"))  # supported: no error


def test_git_commit_is_read_once_per_process(tmp_path, monkeypatch):
    """A sweep records the commit of the code it imported: later commits of the checkout do not change it."""
    import subprocess

    from kvpress_ext.evaluation import results

    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "f.txt").write_text("a")
    subprocess.run([*git, "add", "f.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    first = results.git_commit(repo / "f.txt")
    (repo / "f.txt").write_text("b")
    subprocess.run([*git, "commit", "-qam", "two"], check=True)
    assert results.git_commit(repo / "f.txt") == first and len(first) == 40
    results._git_commit.cache_clear()
    assert results.git_commit(repo / "f.txt") not in (None, first)
