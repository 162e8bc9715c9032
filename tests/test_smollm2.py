"""SmolLM2-135M-Instruct (``smollm2-135m``), the default model: a real 8k-context model with a chat template.

Each check compares against a reference computed here (the same model with no press, or a full prefill), with a
stated tolerance; token counts are kept small because every forward runs 30 layers on a 2-core CPU.
"""

import json
import time
from pathlib import Path

import pytest
import torch
from conftest import shared_path
from transformers import DynamicCache, pipeline

from kvpress_ext.cli import main
from kvpress_ext.core.apply import apply_press
from kvpress_ext.evaluation.press_setup import build_press
from kvpress_ext.presses.a3 import A3Press, ChunkStore
from kvpress_ext.presses.lazy_streaming import LazyStreamingPress
from kvpress_ext.runtime.builtin_models import MARKER, SMOLLM2_SHA256
from kvpress_ext.runtime.chat import split_chat_prompt
from kvpress_ext.runtime.models import resolve_model

pytestmark = pytest.mark.usefixtures("two_threads")

KEY = "73905"
NEEDLE = f"The pass key is {KEY}. Remember it. {KEY} is the pass key."


@pytest.fixture(scope="module")
def novel():
    text = shared_path("data", "pride_and_prejudice.txt").read_text(encoding="utf-8")
    return " ".join(text[text.index("It is a truth universally"):].split())


def _ids(tok, text):
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _words(novel, n):
    return " ".join(novel.split()[:n])


@pytest.mark.slow
def test_the_converted_directory_is_reused_quickly(smollm2):
    t0 = time.perf_counter()
    path = Path(resolve_model("smollm2-135m"))
    assert time.perf_counter() - t0 < 2.0
    assert json.loads((path / MARKER).read_text())["sha256"] == SMOLLM2_SHA256
    model, tok = smollm2
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.max_position_embeddings == 8192 and tok.chat_template
    assert _ids(tok, "Hello") == tok("Hello")["input_ids"]  # no BOS prepended to plain text
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id in (model.generation_config.eos_token_id,)


@pytest.mark.slow
def test_pass_key_is_retrieved_from_600_tokens_without_compression(smollm2, novel):
    model, tok = smollm2
    body = _words(novel, 430)
    cut = body.rfind(". ", 0, len(body) // 2) + 2
    context = body[:cut] + "\n\n" + NEEDLE + "\n\n" + body[cut:]  # the key as its own paragraph, half-way
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device="cpu")
    n_tokens = len(_ids(tok, split_chat_prompt(tok, context, "What is the pass key?").text))
    assert 550 <= n_tokens <= 700
    answer = pipe(context, question="What is the pass key?", max_new_tokens=10)["answer"]
    assert KEY in answer, answer


@torch.no_grad()
def _context_then_question_logits(model, context_ids, question_ids, press):
    cache = DynamicCache()
    with apply_press(press, model):
        model(input_ids=torch.tensor([context_ids]), past_key_values=cache, logits_to_keep=1)
        logits = model(input_ids=torch.tensor([question_ids]), past_key_values=cache).logits[0]
    return logits, cache.get_seq_length()


@pytest.fixture(scope="module")
def short_prompt(smollm2, novel):
    """(prefix + context ids, question suffix ids, dense logits at the question, dense cache length)."""
    model, tok = smollm2
    prefix, context, suffix = split_chat_prompt(tok, _words(novel, 60), "Who is the story about?").ids(tok)
    logits, n = _context_then_question_logits(model, prefix + context, suffix, None)
    return prefix + context, suffix, logits, n


@pytest.mark.slow
@pytest.mark.parametrize("name", ["knorm", "snapkv", "lazy_streaming", "rkv"])
def test_ratio_zero_reproduces_the_logits(smollm2, short_prompt, name):
    model, _ = smollm2
    context, suffix, reference, n_ref = short_prompt
    press, _ = build_press(name, 0.0, {}, len(context) + len(suffix))  # budget presses: room for everything
    logits, n = _context_then_question_logits(model, context, suffix, press)
    assert n == n_ref  # nothing evicted
    assert (logits - reference).abs().max().item() < 1e-4


@pytest.mark.slow
@torch.no_grad()
def test_lazy_streaming_before_its_cap_equals_dense_decoding(smollm2, novel):
    model, tok = smollm2
    prompt_ids = _ids(tok, split_chat_prompt(tok, _words(novel, 40), "Continue the story.").text)
    steps = 12
    press = LazyStreamingPress(cap_total=len(prompt_ids) + steps + 8, slack=4)

    def run(press):
        cache, logits, token = DynamicCache(), [], None
        with apply_press(press, model):
            out = model(input_ids=torch.tensor([prompt_ids]), past_key_values=cache, logits_to_keep=1)
            for _ in range(steps):
                logits.append(out.logits[0, -1])
                token = int(out.logits[0, -1].argmax())
                out = model(input_ids=torch.tensor([[token]]), past_key_values=cache)
        return torch.stack(logits), cache.get_seq_length()

    reference, n_ref = run(None)
    logits, n = run(press)
    assert n == n_ref == len(prompt_ids) + steps
    assert (logits - reference).abs().max().item() < 1e-4


@pytest.mark.slow
@torch.no_grad()
def test_a3_at_rate_one_equals_a_full_prefill(smollm2, novel, tmp_path):
    model, tok = smollm2
    words = novel.split()
    chunk_texts = [" ".join(words[i : i + 25]) + "\n\n" for i in (0, 25, 50)]
    prompt = split_chat_prompt(tok, chunk_texts[-1], "Who is mentioned first?")
    prefix, suffix = prompt.ids(tok)[0], prompt.ids(tok)[2]
    chunks = [_ids(tok, c) for c in chunk_texts]
    store = ChunkStore(tmp_path / "store", model, tok, prefix_ids=prefix)
    full = model(input_ids=torch.tensor([prefix + [t for c in chunks for t in c] + suffix])).logits[0, -len(suffix):]
    for strategy in ("blend", "debug"):  # attention-based selections; at rate 1 every document token is recomputed
        _, fused = A3Press(strategy=strategy, rate=1.0, store=store).fuse(model, chunks, suffix)
        assert (fused - full).abs().max().item() < 1e-4, strategy


@pytest.mark.slow
@pytest.mark.parametrize("press, kwargs, bound", [
    ("rkv", ["budget=48", "window_size=8", "compression_interval=16"], 48 + 16),
    ("lazy_streaming", ["cap_total=64", "slack=16"], 64),
])
def test_generate_runs_end_to_end_on_the_default_model(smollm2, novel, tmp_path, capsys, press, kwargs, bound):
    out = tmp_path / "g.json"
    assert main(["generate", "--prompt", "Summarise: " + _words(novel, 40), "--press", press, "--press_kwargs",
                 *kwargs, "--max_new_tokens", "24", "--no_stop_at_eos", "--no_progress", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["model"] == "smollm2-135m" and record["chat_template"] is True and record["press"] == press
    assert record["generated_tokens"] == 24 and record["text"].strip()
    assert record["prompt_tokens"] + 24 > bound >= record["cache_len_peak"]  # the press really bounded the cache
    assert record["text"] in capsys.readouterr().out
