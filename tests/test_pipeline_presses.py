"""Every registered press on every architecture, through the pipeline and through apply_press.

For each press the test builds it with a compression setting (``compress``) and with an equivalent
no-op setting (``noop``): the no-op press must reproduce the uncompressed logits exactly, and a
ScorerPress must leave exactly ``compute_n_kept(n, ratio)`` tokens after prefill.
"""

import itertools
import math

import kvpress
import pytest
import torch
from kvpress.utils import compute_n_kept
from transformers import DynamicCache, pipeline

import kvpress_ext
from kvpress_ext import apply_press, get_adapter, get_press
from kvpress_ext.core.contract import compression_phases, drives_model
from kvpress_ext.testing import ARCHITECTURES

PRESSES = kvpress_ext.available_presses()
#: A3Press is not a cache-compression hook but a fusion of precomputed chunks: tests/test_a3.py covers it.
RUNNABLE = sorted(
    n for n, info in PRESSES.items()
    if not info.requires and not n.startswith("test_") and (n == "no_press" or issubclass(info.cls, kvpress.BasePress))
)
NEEDS_SOMETHING = sorted(n for n, info in PRESSES.items() if info.requires)
CONTEXT_LEN = 48

#: Limits of kvpress 0.5.5 itself on these tiny random models (they fail the same way in kvpress's own
#: pipeline on Llama); for these the test accepts an exception, and checks everything else when they run.
KVPRESS_LIMITS = {
    "adakv": "head-wise masking cannot always find a nullifying fake key for tiny random heads",
    "critical_adakv": "head-wise masking cannot always find a nullifying fake key for tiny random heads",
    "observed_attention": "needs attn_implementation='eager' (attention weights)",
    "pyramidkv": "window/shape mismatch on short prompts",
    "chunkkv": "shape mismatch when the prompt is not a multiple of chunk_length",
    "kvcompose": "keeps a different number of tokens per layer, which kvpress's decoding under sdpa cannot mask",
    "criticalkv": "reads config.head_dim, which Qwen2's config lacks",
    # kvpress's search_hyperplane needs a nonzero query: a tiny random model's <pad> embedding is all zeros
    # (padding_idx), so a generated <pad> gives zero queries at layer 0 and "Could not find fake keys"
    "dms": "head-wise masking fails on all-zero queries (the tiny model's zero <pad> embedding)",
}


def press_settings(name: str, model, ratio: float) -> dict:
    """Keyword arguments that make ``name`` compress by about ``ratio`` (0: change nothing)."""
    layers = len(get_adapter(model).layers(model))
    if name in ("decoding", "cam"):
        return {"compression_interval": 4, "target_size": CONTEXT_LEN // 2 if ratio else 10_000}
    if name == "compression_ratio_decoding":
        return {"compression_interval": 4, "target_compression_ratio": ratio}
    if name == "dms":
        return {"threshold": 0.5 if ratio else -math.inf, "decoding": True}
    if name == "prefill_decoding":
        if not ratio:
            return {}
        return {"prefilling_press": get_press("knorm", compression_ratio=ratio),
                "decoding_press": get_press("decoding", base_press="knorm", compression_interval=4, target_size=40)}
    if name == "per_layer_compression":
        return {"compression_ratios": [ratio] * layers}
    if name == "rkv":
        return {"budget": CONTEXT_LEN // 2 if ratio else 10_000, "window_size": 4, "compression_interval": 8}
    if name == "lazy_streaming":
        return {"cap_total": CONTEXT_LEN // 2, "slack": 4} if ratio else {"window": 10_000, "slack": 0}
    if name == "simlayerkv":
        return {"lazy_threshold": 0.0 if ratio else 1.0, "n_initial": 4, "n_recent": 8, "n_last": 1}
    if name == "think":
        return {"key_channel_compression_ratio": ratio, "window_size": 8}
    if name == "no_press":
        return {}
    kw = {"compression_ratio": ratio}
    if name in ("snapkv", "pyramidkv", "finch"):
        kw["window_size"] = 8
    return kw


def build(name, model, ratio):
    """The press at ``ratio``; at 0 it removes nothing on purpose (the reference), so its warning saying so is
    expected and silenced."""
    import warnings

    from kvpress_ext.core.errors import NoCompressionWarning

    with warnings.catch_warnings():
        if ratio == 0:
            warnings.simplefilter("ignore", NoCompressionWarning)
        return get_press(name, **press_settings(name, model, ratio))


def context_ids(vocab=100, n=CONTEXT_LEN, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (1, n), generator=g)


def question_logits(model, press, ids, question):
    """Prefill ``ids`` under ``press`` (its prefill phase), then the logits of the question tokens."""
    cache = DynamicCache()
    prefill, decoding = compression_phases(press)
    with torch.no_grad():
        with apply_press(press if prefill else None, model):
            get_adapter(model).decoder(model)(input_ids=ids, past_key_values=cache)
        length = cache.get_seq_length(get_adapter(model).compressed_layers(model)[0])
        with apply_press(press if decoding else None, model):
            logits = model(input_ids=question, past_key_values=cache).logits
    return logits, length


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNNABLE)
def test_press_runs_compresses_as_promised_and_noop_reproduces_logits(name, arch_model, tokenizer):
    try:
        _check_press(name, arch_model, tokenizer)
    except Exception:
        if name not in KVPRESS_LIMITS:
            raise


def _check_press(name, arch_model, tokenizer):
    arch, model = arch_model
    press = build(name, model, 0.5)
    if drives_model(press) and arch == "gpt_neox":
        with pytest.raises(kvpress_ext.UnsupportedModelError, match="Llama-family"):
            question_logits(model, press, context_ids(), context_ids(n=4, seed=1))
        return
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
    out = pipe("The quick brown fox jumps over the lazy dog. " * 2, question="Why?", press=press, max_new_tokens=6)
    assert isinstance(out["answer"], str)

    ids, question = context_ids(), context_ids(n=4, seed=1)
    reference, full_len = question_logits(model, None, ids, question)
    assert full_len == CONTEXT_LEN
    _, compressed_len = question_logits(model, build(name, model, 0.5), ids, question)
    prefill, _ = compression_phases(press)
    if isinstance(press, kvpress.ScorerPress) and prefill:
        assert compressed_len == compute_n_kept(CONTEXT_LEN, 0.5)
    else:
        assert compressed_len <= CONTEXT_LEN

    noop_logits, noop_len = question_logits(model, build(name, model, 0.0), ids, question)
    assert noop_len == CONTEXT_LEN
    torch.testing.assert_close(noop_logits, reference, atol=0, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["decoding", "compression_ratio_decoding"])
def test_decoding_presses_compress_while_the_pipeline_generates(name, tiny_models, tokenizer):
    model = tiny_models["gpt_neox"]
    press = build(name, model, 0.5)
    sizes = []
    hook = get_adapter(model).attention_modules(model)[0].register_forward_hook(
        lambda m, a, k, o: sizes.append(k["layer_past"].get_seq_length(0)), with_kwargs=True
    )
    try:
        pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
        pipe("abcdefgh" * 8, question="?", press=press, max_new_tokens=40)
    finally:
        hook.remove()
    prompt = len(tokenizer.encode("<s>" + "abcdefgh" * 8, add_special_tokens=False)) + 2
    assert min(sizes[1:]) >= 1 and max(sizes) < prompt + 40, sizes  # evictions happened during decoding
    assert any(b < a for a, b in itertools.pairwise(sizes)), sizes


@pytest.mark.parametrize("name", NEEDS_SOMETHING)
def test_presses_that_need_hub_files_say_so_and_fail_here(name, tiny_models):
    """The `requires` note is accurate: these presses cannot run offline on a random model."""
    assert PRESSES[name].requires
    model = tiny_models["llama"]
    with pytest.raises(Exception):  # noqa: B017 - hub errors differ per press (OSError, ValueError, ...)
        press = get_press(name)
        question_logits(model, press, context_ids(), context_ids(n=4, seed=1))


#: kvpress's own presses (ours compress while decoding or move positions, which kvpress's pipeline does not do).
KVPRESS_PARITY = [n for n in RUNNABLE if n != "no_press" and PRESSES[n].cls.__module__.startswith("kvpress.")]


@pytest.mark.slow
@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a not in ("gpt_neox", "gemma3")])
def test_same_answers_as_kvpress_pipeline(arch, tiny_models, tokenizer):
    """Where kvpress supports the model, our pipeline answers exactly as kvpress's own pipeline. (Gemma 3: kvpress
    compresses the sliding-window layers of the text-only class, on purpose not ours; tests/test_gemma3.py compares
    the caches with kvpress's Gemma 3 rule instead.)"""
    model = tiny_models[arch]
    ours = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
    theirs = kvpress.KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer, device="cpu")
    context = "Once upon a time there was a fox. " * 3
    checked = 0
    for name in KVPRESS_PARITY:
        press = build(name, model, 0.5)
        if drives_model(press):
            continue
        kw = {"question": "Who?", "max_new_tokens": 8}
        if not compression_phases(press)[1]:
            kw = {"questions": ["Who?", "Where?"], "max_new_tokens": 8}
        try:
            torch.manual_seed(0)
            b = theirs(context, press=build(name, model, 0.5), **kw)
        except Exception as exc:  # noqa: BLE001 - kvpress fails here too: ours must not silently answer differently
            assert name in KVPRESS_LIMITS, (name, exc)
            continue
        torch.manual_seed(0)
        a = ours(context, press=press, **kw)
        assert a == b, name
        checked += 1
    assert checked >= 25


def test_short_input_compresses_nothing_with_one_warning(tiny_models, tokenizer):
    """kvpress rejects some inputs with a bare assert (SnapKV: a context no longer than its window). A first call
    with a short context must not crash: the press leaves the cache uncompressed (so the answer is the no-press
    answer) and one warning, naming the press, the reason and the fix, says so."""
    import warnings

    from kvpress_ext.core.errors import PressSkippedWarning

    pipe = pipeline("kv-press-text-generation", model=tiny_models["llama"], tokenizer=tokenizer, device="cpu")
    context = "abcdefgh" * 2  # 16 tokens, window_size 64
    reference = pipe(context, question="x", max_new_tokens=4)["answer"]
    press = get_press("snapkv", compression_ratio=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        answer = pipe(context, question="x", press=press, max_new_tokens=4)["answer"]
        pipe(context, question="y", press=press, max_new_tokens=4)  # same press again: no second warning
    skipped = [w for w in caught if issubclass(w.category, PressSkippedWarning)]
    assert len(skipped) == 1, [str(w.message) for w in caught]
    message = str(skipped[0].message)
    assert "snapkv did not compress" in message and "window size 64" in message, message
    assert "kvpress-ext describe snapkv" in message
    assert answer == reference


def test_attention_assertion_becomes_an_error_that_names_the_press(tiny_models, tokenizer):
    """An assert about the attention kernel is not a short input: it stays an error (naming the press and the
    fix), still an AssertionError for code that handled kvpress's asserts (the sweep retries with sdpa)."""
    from kvpress_ext.core.errors import PressInputError

    model = tiny_models["llama"]
    press = get_press("block", press="knorm", compression_ratio=0.5, block_size=4)  # refuses eager weights
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with pytest.raises(PressInputError, match=r"block cannot compress this input: .*attention.*describe block"):
            pipe("abcdefgh" * 4, question="x", press=press, max_new_tokens=2)
    finally:
        model.set_attn_implementation(previous)
    assert issubclass(PressInputError, AssertionError)


def test_kvpress_log_lines_once_per_message(tiny_models, tokenizer, caplog):
    """SimLayerKV logs "Sequence length is shorter than ...: no compression applied" for every layer of every
    forward; a command-line user sees it once."""
    import logging

    from kvpress_ext.core import apply

    apply._ONCE.seen.clear()  # earlier tests may have shown it already
    pipe = pipeline("kv-press-text-generation", model=tiny_models["llama"], tokenizer=tokenizer, device="cpu")
    press = get_press("simlayerkv")
    apply.quiet_repeated_kvpress_logs()  # what every command does first (cli.common.quiet_command_line)
    try:
        with caplog.at_level(logging.WARNING):
            pipe("abcdefgh" * 4, question="x", press=press, max_new_tokens=3)
            pipe("abcdefgh" * 5, question="x", press=press, max_new_tokens=3)
    finally:
        apply.quiet_repeated_kvpress_logs(enable=False)
    lines = [r.getMessage() for r in caplog.records if "no compression applied" in r.getMessage()]
    assert len(lines) == 1, lines
