"""The long-context grid on models whose presses leave some layers alone (Gemma 3's sliding-window layers): the
needle-kept diagnostic and the cache size of a cell measure the layers the press compresses, and a model whose
every layer is compressed (Llama-shaped) gets what it got before."""

from __future__ import annotations

import pytest

from kvpress_ext.evaluation import model_cache
from kvpress_ext.evaluation.runners.longcontext import run_cell
from kvpress_ext.evaluation.runners.needle_kept import token_positions
from kvpress_ext.evaluation.tasks.needle import needle_sample
from kvpress_ext.evaluation.tasks.prompts import split_prompt
from kvpress_ext.testing import tiny_model, tiny_tokenizer, write_story_haystack

#: (architecture, layers, the layers presses compress): Gemma 3's tiny model alternates sliding and full layers.
MODELS = {"llama": (3, [0, 1, 2]), "gemma3": (4, [1, 3])}
RATIO = 0.5


@pytest.fixture(scope="module")
def hay(tmp_path_factory):
    return write_story_haystack(tmp_path_factory.mktemp("hay") / "hay.txt", 10)


@pytest.fixture(scope="module", params=sorted(MODELS))
def arch(request):
    """A tiny random model of the architecture, under the name ``tiny-<arch>``, with a character-level tokenizer
    (no chat template: prompted completion-style, as gemma3-270m is)."""
    layers, _ = MODELS[request.param]
    model_cache.preload_model(f"tiny-{request.param}", tiny_model(request.param, layers=layers), tiny_tokenizer())
    return request.param


def cell(hay, arch, **kw):
    params = {"source": "needle", "task": "passkey", "haystack": hay, "length": 160, "depth": 0.5, "key_index": 0,
              "seed": 0, "n_needles": 1, "model": f"tiny-{arch}", "max_new_tokens": 3, "chunk_tokens": 32,
              "max_context_tokens": None, "attn_implementation": None, "chat_template": True, "diagnostic": True,
              "method": "streaming_llm", "compression_ratio": RATIO, "rate": None, "query_aware": False}
    return {**params, **kw}


def streaming_kept_by_hand(hay, arch, n: int) -> float:
    """The fraction of the needle's tokens StreamingLLM keeps of ``n`` compressed tokens: 4 sinks + the most
    recent ones, ``int(n * (1 - ratio))`` in all."""
    tok = tiny_tokenizer()
    sample = needle_sample(tok, cell(hay, arch))
    text = split_prompt(tok, sample.context, sample.question).compressed
    needle = sample.meta["needle_texts"][0]
    positions = token_positions(tok, text, [(text.index(needle), text.index(needle) + len(needle))])
    n_kept = int(n * (1 - RATIO))
    kept = set(range(4)) | set(range(n - (n_kept - 4), n))
    return len(kept & set(positions)) / len(positions)


@pytest.fixture(scope="module")
def streaming(hay, arch):
    """The StreamingLLM cell of the architecture (run once for the tests below)."""
    return run_cell(cell(hay, arch))


def test_needle_kept_is_measured_on_the_compressed_layers_only(hay, arch, streaming):
    """Gemma 3's sliding layers hold the whole needle in the grid's cache: counted, they would lift the figure
    towards 1. Llama-shaped: every layer, as before."""
    r = streaming
    _, compressed = MODELS[arch]
    expected = streaming_kept_by_hand(hay, arch, r["compressed_tokens"])
    assert 0 < expected < 1  # the needle straddles the window's edge: a real test of the matching
    assert r["needle_kept_layers"] == compressed
    assert r["needle_kept"] == pytest.approx([expected] * len(compressed), abs=1e-6)
    assert r["needle_kept_mean"] == pytest.approx(expected, abs=1e-6)


def test_cache_size_is_the_compressed_layers_length(arch, streaming):
    """kvpress keeps ``int(n * (1 - ratio))`` of the compressed part, then the rest is appended: that is the
    compressed layers' length. ``cache_tokens`` (the first layer's) is a sliding layer on Gemma 3, holding all."""
    r = streaming
    n, rest = r["compressed_tokens"], r["rest_tokens"]
    assert r["compressed_cache_tokens"] == r["compressed_cache_tokens_max"] == int(n * (1 - RATIO)) + rest
    assert r["cache_tokens"] == (n + rest if arch == "gemma3" else int(n * (1 - RATIO)) + rest)


def test_a3_cells_report_the_compressed_layers_length(hay, arch):
    """A3 fusion then eviction: the eviction shrinks the compressed layers only."""
    r = run_cell(cell(hay, arch, method="a3-debug+streaming_llm", rate=0.15))
    assert r["compressed_cache_tokens"] < r["context_tokens"] + r["rest_tokens"]
    assert r["compressed_cache_tokens_max"] == r["compressed_cache_tokens"]
    whole = r["context_tokens"] + r["rest_tokens"]
    assert r["cache_tokens"] == (whole if arch == "gemma3" else r["compressed_cache_tokens"])
