"""Chat-template prompts (:mod:`kvpress_ext.runtime.chat`) and every entry point that uses them.

The entry points are checked on stories260k given a ChatML template (a real model and tokenizer, cheap): each one's
model input must be exactly ``prefix + context + suffix`` of :func:`split_chat_prompt`, checked against
``tokenizer.apply_chat_template`` of the user turn ``context + blank line + question`` or a greedy reference
computed here without any cache. ``--no_chat_template`` gives back the raw-text prompt.
"""

import json

import pytest
import torch
from conftest import shared_path
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
from transformers.utils import logging as hf_logging

from kvpress_ext.cli import main
from kvpress_ext.icl import workflow as wf
from kvpress_ext.runtime.chat import chat_turn_break, separator, split_chat_prompt
from kvpress_ext.testing import tiny_tokenizer

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PREFIX = "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n"
TAIL = "<|im_end|>\n<|im_start|>assistant\n"
CONTEXT = "Tom had a big red ball. He liked to play with it in the park. One day, Tom saw a little dog."
QUESTION = "What did Tom have?"


def _chat_tokenizer(tok):
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    """stories260k with a ChatML template (the tokenizer is otherwise unchanged)."""
    hf_logging.disable_progress_bar()
    src = shared_path("models", "stories260k")
    out = tmp_path_factory.mktemp("chat_model")
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(out)
    _chat_tokenizer(AutoTokenizer.from_pretrained(src)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def chat_model(chat_model_dir):
    return AutoModelForCausalLM.from_pretrained(chat_model_dir).eval(), AutoTokenizer.from_pretrained(chat_model_dir)


def _ids(tok, text):
    return list(tok(text, add_special_tokens=False)["input_ids"])


@torch.no_grad()
def _greedy_without_cache(model, ids, n):
    out = []
    for _ in range(n):
        out.append(int(model(torch.tensor([ids + out])).logits[0, -1].argmax()))
    return out


# --- the function ------------------------------------------------------------------------------------------------
def test_split_matches_the_template_rendering_of_context_blank_line_question():
    tok = _chat_tokenizer(tiny_tokenizer())
    prompt = split_chat_prompt(tok, CONTEXT, QUESTION)
    assert prompt.templated and tuple(prompt) == (PREFIX, CONTEXT, "\n\n" + QUESTION + TAIL)
    rendered = tok.apply_chat_template([{"role": "user", "content": CONTEXT + "\n\n" + QUESTION}],
                                       add_generation_prompt=True, tokenize=False)
    assert prompt.text == rendered
    system = split_chat_prompt(tok, CONTEXT, QUESTION, system="Be brief.")
    assert system.prefix == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    assert split_chat_prompt(tok, "Just a prompt", "").text == PREFIX + "Just a prompt" + TAIL
    assert chat_turn_break(tok) == "<|im_end|>\n<|im_start|>user\n"


@pytest.mark.parametrize("context, question, sep", [
    ("a", "b", "\n\n"), ("a\n", "b", "\n"), ("a\n\n", "b", ""), ("a", "\n\nb", ""), ("a\n", "\nb", ""),
    ("", "b", ""), ("a", "", ""),
])
def test_the_separator_makes_exactly_one_blank_line(context, question, sep):
    assert separator(context, question) == sep


def test_without_a_template_or_when_turned_off_the_prompt_is_raw_text():
    tok = tiny_tokenizer()
    assert tuple(split_chat_prompt(tok, CONTEXT, QUESTION)) == ("<s>", CONTEXT, QUESTION)
    tok = _chat_tokenizer(tiny_tokenizer())
    off = split_chat_prompt(tok, CONTEXT, QUESTION, use_chat_template=False)
    assert not off.templated and tuple(off) == ("<s>", CONTEXT, QUESTION)


# --- the entry points ----------------------------------------------------------------------------------------------
def test_pipeline_answers_from_the_templated_prompt(chat_model):
    model, tok = chat_model
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device="cpu")
    prompt = split_chat_prompt(tok, CONTEXT, QUESTION)
    reference = _greedy_without_cache(model, _ids(tok, prompt.prefix + CONTEXT) + _ids(tok, prompt.suffix), 6)
    eos = model.generation_config.eos_token_id
    if eos in reference:
        reference = reference[: reference.index(eos) + 1]
    assert pipe(CONTEXT, question=QUESTION, max_new_tokens=6)["answer"] == tok.decode(reference,
                                                                                       skip_special_tokens=True)
    raw = pipe.preprocess(CONTEXT, [QUESTION], "", 10**6, use_chat_template=False)
    assert raw["context_ids"][0].tolist() == _ids(tok, tok.bos_token + CONTEXT)  # as kvpress without a template
    assert raw["questions_ids"][0][0].tolist() == _ids(tok, QUESTION + "\n")
    templated = pipe.preprocess(CONTEXT, [QUESTION], "", 10**6)
    assert templated["questions_ids"][0][0].tolist() == _ids(tok, prompt.suffix)


def test_generate_feeds_the_prompt_as_the_user_turn(chat_model_dir, chat_model, tmp_path, capsys):
    model, tok = chat_model
    prompt = "Once upon a time"
    out = tmp_path / "g.json"
    assert main(["generate", "--model", str(chat_model_dir), "--prompt", prompt, "--max_new_tokens", "5",
                 "--no_progress", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    ids = _ids(tok, split_chat_prompt(tok, prompt).text)
    assert record["chat_template"] is True and record["prompt_tokens"] == len(ids)
    assert record["generated_ids"] == _greedy_without_cache(model, ids, len(record["generated_ids"]))
    assert main(["generate", "--model", str(chat_model_dir), "--prompt", prompt, "--max_new_tokens", "5",
                 "--no_progress", "--no_chat_template", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["chat_template"] is False and record["prompt_tokens"] == len(tok(prompt)["input_ids"])
    capsys.readouterr()


def test_a3_ask_fuses_chunks_between_the_template_prefix_and_suffix(chat_model_dir, chat_model, tmp_path, capsys):
    model, tok = chat_model
    chunks = tmp_path / "chunks.json"
    texts = ["Tom had a big red ball. ", "He liked to play with it in the park.\n\n", "Lily had a cat."]
    chunks.write_text(json.dumps(texts))
    store, out = tmp_path / "store", tmp_path / "ask.json"
    assert main(["a3", "precompute", "--model", str(chat_model_dir), "--chunks", str(chunks), "--store",
                 str(store)]) == 0
    assert main(["a3", "ask", "--model", str(chat_model_dir), "--chunks", str(chunks), "--store", str(store),
                 "--question", QUESTION, "--rate", "1.0", "--max_new_tokens", "6", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    prompt = split_chat_prompt(tok, texts[-1], QUESTION)
    ids = _ids(tok, prompt.prefix) + [t for c in texts for t in _ids(tok, c)] + _ids(tok, prompt.suffix)
    assert result["chat_template"] is True and result["prefix_tokens"] == len(_ids(tok, PREFIX))
    assert result["question_tokens"] == len(_ids(tok, prompt.suffix))
    assert result["answer_ids"] == _greedy_without_cache(model, ids, len(result["answer_ids"]))
    # precompute without the template stored other chunks (the prefix is part of their key): ask says how to fix it
    assert main(["a3", "ask", "--model", str(chat_model_dir), "--chunks", str(chunks), "--store", str(store),
                 "--question", QUESTION, "--no_chat_template"]) == 2
    assert "--no_chat_template` first" in capsys.readouterr().err


def test_icl_cache_is_one_user_turn_and_questions_follow_the_cache(chat_model, tmp_path):
    model, tok = chat_model
    docs = [{"question": "Tom has 2 apples and gets 3 more. How many?", "solution": "2 + 3 = 5.", "answer": "5"}]
    out = tmp_path / "cache"
    meta = wf.precompute(model, tok, docs, out, budget=512, window_size=4, mode="none")
    prefix = _ids(tok, PREFIX)
    assert meta["extra"]["chat_template"] is True
    assert meta["token_ids"] == prefix + _ids(tok, wf.format_document(docs[0]))
    q = wf.question_ids(tok, "Lily has 4 toys. How many?", True)
    assert q == _ids(tok, "Problem: Lily has 4 toys. How many?" + TAIL + "Solution:")  # documents end in a blank line
    result = wf.evaluate(model, tok, out, [{"question": "Lily has 4 toys. How many?"}], max_new_tokens=4,
                         temperature=0.0)
    assert result["settings"]["chat_template"] is True
    expected = _greedy_without_cache(model, meta["token_ids"] + q, 4)
    eos = model.generation_config.eos_token_id
    expected = expected[: expected.index(eos)] if eos in expected else expected
    assert tok.decode(expected, skip_special_tokens=True) == result["records"][0]["generations"][0]
    with pytest.raises(wf.ICLInputError, match="drop --no_chat_template"):
        wf.evaluate(model, tok, out, [{"question": "x"}], use_chat_template=False)
    # with notes: the note is the assistant's reply, then a new user turn opens
    meta = wf.precompute(model, tok, docs, tmp_path / "notes", budget=512, window_size=4, mode="takeaways",
                         max_note_tokens=3)
    instruction, start = wf.note_instruction("takeaways", "simple", None)
    note_prompt = _ids(tok, split_chat_prompt(tok, "\n\n", instruction).suffix + start)
    head = prefix + _ids(tok, wf.format_document(docs[0])) + note_prompt
    assert meta["token_ids"][: len(head)] == head
    assert meta["token_ids"][-len(_ids(tok, chat_turn_break(tok))):] == _ids(tok, chat_turn_break(tok))


def test_pipeline_a3_fuses_between_the_template_prefix_and_suffix(chat_model, tmp_path):
    from kvpress_ext.presses.a3 import A3Press, ChunkStore

    model, tok = chat_model
    texts = ["Tom had a big red ball. ", "He liked to play with it in the park."]
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device="cpu")
    press = A3Press(strategy="debug", rate=1.0, store=ChunkStore(tmp_path / "s", model, tok))
    answer = pipe(context_chunks=texts, question=QUESTION, press=press, max_new_tokens=5)["answer"]
    prompt = split_chat_prompt(tok, texts[-1], QUESTION)
    ids = _ids(tok, prompt.prefix) + [t for c in texts for t in _ids(tok, c)] + _ids(tok, prompt.suffix)
    reference = _greedy_without_cache(model, ids, 5)
    eos = model.generation_config.eos_token_id
    reference = reference[: reference.index(eos) + 1] if eos in reference else reference
    assert answer == tok.decode(reference, skip_special_tokens=True)


def test_longcontext_asks_with_the_template(chat_model, tmp_path):
    import json

    from kvpress_ext.evaluation import longcontext as lc
    from kvpress_ext.evaluation.model_cache import preload_model
    from kvpress_ext.evaluation.runners.longcontext import run_cell

    model, tok = chat_model
    context = "Tom had a ball.\n\nLily had a cat."
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"context": context, "question": QUESTION, "outputs": ["ball"]}) + "\n")
    preload_model("chat-test", model, tok)
    params = {"source": "file", "format": "ruler", "data_file": str(data), "index": 0, "model": "chat-test",
              "max_new_tokens": 4, "chunk_tokens": 16, "max_context_tokens": None, "attn_implementation": None,
              "chat_template": True, "diagnostic": False, "compression_ratio": None, "rate": 1.0, "query_aware": False}
    chunks = lc.chunk_context(tok, context, 16)
    suffix = _ids(tok, "\n\n" + split_chat_prompt(tok, context, QUESTION).suffix.lstrip("\n"))
    assert suffix == _ids(tok, "\n\n" + QUESTION + TAIL)  # blank line, question, end of turn, assistant header
    ids = _ids(tok, PREFIX) + [t for c in chunks for t in c] + suffix
    reference = _greedy_without_cache(model, ids, 4)
    eos = model.generation_config.eos_token_id
    reference = reference[: reference.index(eos) + 1] if eos in reference else reference
    # no press on the whole prompt; prefill and A3 (rate 1.0: the fusion recomputes everything) on its chunks
    for method in ("no_press", "prefill", "a3-debug"):
        record = run_cell({**params, "method": method, "compression_ratio": 0.0 if method == "no_press" else None})
        assert record["chat_template"] and record["rest_tokens"] == len(suffix), method
        assert record["prediction"] == tok.decode(reference, skip_special_tokens=True), method
