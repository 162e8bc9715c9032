"""Importing kvpress_ext takes over kvpress's "kv-press-text-generation" task: the takeover must behave as
kvpress's own pipeline (same answers, same log records, same warnings and errors).

Both pipelines run side by side on one tiny random Llama: ``pipeline(...)`` (ours, registered by the
import) and kvpress's ``KVPressTextGenerationPipeline`` built directly.
"""

import logging
import warnings

import pytest
import torch
from kvpress import DecodingPress, KnormPress, KVPressTextGenerationPipeline, SnapKVPress, StreamingLLMPress
from transformers import pipeline

from kvpress_ext.runtime.pipeline import KVPressExtPipeline
from kvpress_ext.testing import tiny_model, tiny_tokenizer

CONTEXT = "the quick brown fox jumps over the lazy dog. " * 3


@pytest.fixture(scope="module")
def pipes():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    ours = pipeline("kv-press-text-generation", model=model, tokenizer=tok)
    theirs = KVPressTextGenerationPipeline(model=model, tokenizer=tok)
    assert type(ours) is KVPressExtPipeline and type(theirs) is KVPressTextGenerationPipeline
    return ours, theirs


def run_recorded(pipe, *args, **kwargs):
    """(result or exception text, log records of the kvpress loggers, warnings) of one call."""
    records = []
    handler = logging.Handler(level=logging.DEBUG)
    handler.emit = records.append
    logger = logging.getLogger("kvpress")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result = pipe(*args, **kwargs)
            except ValueError as e:
                result = f"ValueError: {e}"
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    logs = [(r.name, r.levelname, r.getMessage()) for r in records]
    return result, logs, [(w.category, str(w.message)) for w in caught]


PRESSES = {
    "none": lambda: None,
    "knorm": lambda: KnormPress(compression_ratio=0.5),
    "snapkv": lambda: SnapKVPress(compression_ratio=0.3, window_size=4),
    "streaming_llm": lambda: StreamingLLMPress(compression_ratio=0.5, n_sink=2),
    "decoding": lambda: DecodingPress(base_press=KnormPress(), compression_interval=4, target_size=40),
}


@pytest.mark.slow
@pytest.mark.parametrize("press", sorted(PRESSES))
@pytest.mark.parametrize("questions", [{}, {"question": " why?"}, {"questions": [" why?", " who?"]}])
@pytest.mark.parametrize("max_context_length", [None, 40])  # 40: kvpress warns about the truncation
def test_same_answers_logs_and_warnings_as_kvpress_pipeline(pipes, press, questions, max_context_length):
    ours, theirs = pipes
    kw = {"max_new_tokens": 12, "max_context_length": max_context_length, **questions}
    got = run_recorded(ours, CONTEXT, press=PRESSES[press](), **kw)
    want = run_recorded(theirs, CONTEXT, press=PRESSES[press](), **kw)
    assert got == want
    result, logs, _ = want
    if not str(result).startswith("ValueError"):
        mine = [m for name, level, m in logs if name == "kvpress.pipeline" and level == "DEBUG"]
        assert mine[0].startswith("Context Length: ") and mine[1].startswith("Compressed Context Length: ")
        if max_context_length:
            assert mine[0] == f"Context Length: {max_context_length}"
    if max_context_length:
        assert any(level == "WARNING" and "truncated" in m for _, level, m in logs)


def test_first_token_eos_does_not_stop_either_pipeline(pipes):
    ours, theirs = pipes
    model = ours.model
    inputs = theirs.preprocess(CONTEXT, questions=[" why?"], answer_prefix="", max_context_length=10**6)
    ids = torch.cat([inputs["context_ids"], inputs["questions_ids"][0]], dim=1)
    with torch.no_grad():
        first = int(model(input_ids=ids).logits[0, -1].argmax())
    model.generation_config.eos_token_id = first  # the first answer token is an end-of-sequence token
    try:
        got = ours(CONTEXT, question=" why?", max_new_tokens=8)
        want = theirs(CONTEXT, question=" why?", max_new_tokens=8)
    finally:
        model.generation_config.eos_token_id = None
    assert got == want and want["answer"]  # kvpress goes on after it


def test_pipeline_from_a_path_loads_without_the_per_tensor_bar(capfd):
    """``pipeline(model=PATH)`` loads the model with transformers' "Loading weights" bar hidden (a line per tensor
    of noise), and leaves the user's progress-bar setting as it was."""
    from conftest import shared_path
    from transformers.utils import logging as hf_logging

    path = str(shared_path("models", "stories260k"))
    hf_logging.enable_progress_bar()
    pipe = pipeline("kv-press-text-generation", model=path)
    assert type(pipe) is KVPressExtPipeline and pipe.model.config.model_type == "llama"
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()
