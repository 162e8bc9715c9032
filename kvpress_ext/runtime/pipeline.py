"""``pipeline("kv-press-text-generation", ...)`` for every registered press on every adapter.

It keeps kvpress's pipeline (preprocessing, several questions per context) and changes what kvpress
hard-wires: presses run through :func:`kvpress_ext.core.apply.apply_press` (so GPT-NeoX and plugin presses
work), presses that compress while decoding stay active during the answer, and every position comes
from the cache's :class:`~kvpress_ext.core.positions.PositionState` instead of ``context_length + i``.
``press`` may also be a registry name (``press="knorm"``). A list of contexts returns one answer per context, like a
Hugging Face pipeline given a list: ``question=`` is asked of every context, ``questions=[...]`` gives one per
context, and ``batch_size=N`` runs N contexts at once as a left-padded batch
(:func:`kvpress_ext.runtime.batched.generate_batch`; each compressed as if alone). ``prefill_chunk_size=N`` feeds
the context in chunks of N tokens and compresses after each. With a chat template the prompt comes from
:func:`kvpress_ext.runtime.chat.split_chat_prompt` (user turn = context, blank line, question), like every other
entry point; ``use_chat_template=False`` turns it off (raw text, as kvpress does without a template).

Everything else behaves as kvpress's pipeline, which this one replaces under the same task name once
``kvpress_ext`` is imported: the same answers, the same log records (``kvpress.pipeline`` logger, e.g.
the debug lines ``Context Length: N`` / ``Compressed Context Length: M`` after the prefill), the same
warnings and errors.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from kvpress import DecodingPress, KVPressTextGenerationPipeline, PrefillDecodingPress
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.utils import logging as hf_logging

from kvpress_ext.core.adapters import get_adapter
from kvpress_ext.core.apply import apply_press
from kvpress_ext.core.chunked_prefill import check_prefill_chunk_size, press_for_chunks
from kvpress_ext.core.contract import compression_phases, fuses_chunks
from kvpress_ext.core.contract import prefill_chunk_size as press_chunk_size
from kvpress_ext.core.devices import input_device
from kvpress_ext.core.positions import BatchInputError, position_state
from kvpress_ext.core.registry import get_press
from kvpress_ext.core.tokens import eos_token_ids
from kvpress_ext.runtime.batched import generate_batch
from kvpress_ext.runtime.chat import has_chat_template, split_chat_prompt

#: kvpress's pipeline logger: our records go where kvpress's users (and kvpress's tests) look for them.
kvpress_logger = logging.getLogger(KVPressTextGenerationPipeline.__module__)


def greedy_decode(model, first_ids: torch.Tensor, cache, max_new_tokens: int, eos_token_ids=(),
                  stop_at_first: bool = True) -> list[int]:
    """Feed ``first_ids`` then decode greedily; positions come from the cache (call inside apply_press).

    Stops after an end-of-sequence token; ``stop_at_first=False`` does not check the first generated
    token, as kvpress's pipeline does not.
    """
    outputs = model(input_ids=first_ids, past_key_values=cache, logits_to_keep=1)
    generated = [int(outputs.logits[0, -1].argmax())]
    for _ in range(max_new_tokens - 1):
        if generated[-1] in eos_token_ids and (stop_at_first or len(generated) > 1):
            break
        next_ids = torch.tensor([[generated[-1]]], device=first_ids.device)
        outputs = model(input_ids=next_ids, past_key_values=cache, logits_to_keep=1)
        generated.append(int(outputs.logits[0, -1].argmax()))
    return generated


class KVPressExtPipeline(KVPressTextGenerationPipeline):
    """kvpress's text-generation pipeline, driven through kvpress_ext's adapters and position state."""

    def _sanitize_parameters(self, press=None, max_context_length=None, use_chat_template=None,
                             prefill_chunk_size=None, **kwargs):
        if isinstance(press, str):
            press = get_press(press)
        if max_context_length is None and press is not None and press_chunk_size(press):
            # The press streams any input through a bounded cache (lazy_streaming): no truncation to the
            # tokenizer's model_max_length, which is exactly the limit such a press exists to lift.
            max_context_length = int(1e10)
        pre, fwd, post = super()._sanitize_parameters(press=press, max_context_length=max_context_length, **kwargs)
        if use_chat_template is not None:
            pre["use_chat_template"] = bool(use_chat_template)
        if prefill_chunk_size is not None:
            fwd["prefill_chunk_size"] = prefill_chunk_size
        return pre, fwd, post

    def preprocess(self, context: str, questions: list[str], answer_prefix: str, max_context_length: int,
                   enable_thinking: bool = False, use_chat_template: bool = True):
        """Token ids of the context (template prefix + context) and of each question (blank line, question, end of
        turn, assistant header, ``answer_prefix``); without a template (or ``use_chat_template=False``) kvpress's
        own preprocessing (BOS + context; question + newline)."""
        if not has_chat_template(self.tokenizer):
            return super().preprocess(context, questions, answer_prefix, max_context_length, enable_thinking)
        if not use_chat_template:  # what kvpress does for a model without a template
            prompts = [split_chat_prompt(self.tokenizer, context, q + "\n", use_chat_template=False) for q in questions]
            context_ids = self.tokenizer.encode(prompts[0].prefix + context, return_tensors="pt",
                                                add_special_tokens=False)[:, :max_context_length]
            question_ids = [self.tokenizer.encode(p.suffix + answer_prefix, return_tensors="pt",
                                                  add_special_tokens=False) for p in prompts]
            return {"context_ids": context_ids, "questions_ids": question_ids}
        if enable_thinking:
            raise ValueError("enable_thinking is not supported by kvpress_ext's chat prompts.")
        parts = [split_chat_prompt(self.tokenizer, context, q) for q in questions]
        context_ids = self.tokenizer.encode(parts[0].prefix + context, return_tensors="pt", add_special_tokens=False)
        question_ids = [self.tokenizer.encode(p.suffix + answer_prefix, return_tensors="pt", add_special_tokens=False)
                        for p in parts]
        if context_ids.shape[1] > max_context_length:
            context_ids = context_ids[:, :max_context_length]  # kvpress keeps the head, and so do we
        return {"context_ids": context_ids, "questions_ids": question_ids}

    def __call__(self, *args, context_chunks=None, **kwargs):
        """``context_chunks=[...]`` hands separately cached chunks to a press that fuses them itself
        (e.g. A3Press, see :func:`answer_from_chunks`); a list of contexts is answered one answer per context (see
        the module docstring); otherwise this is kvpress's pipeline unchanged."""
        contexts = args[0] if args else kwargs.get("context")
        if context_chunks is None and isinstance(contexts, (list, tuple)):
            kwargs.pop("context", None)
            return self._answer_list(list(contexts), *args[1:], **kwargs)
        if context_chunks is None:
            return super().__call__(*args, **kwargs)
        press = kwargs.pop("press", None)
        press = get_press(press) if isinstance(press, str) else press
        if args or press is None or not fuses_chunks(press):
            raise ValueError(
                "context_chunks=... needs a press that fuses chunk caches (e.g. press=A3Press(store=...)) and no "
                "positional context."
            )
        return answer_from_chunks(self, press, list(context_chunks), **kwargs)

    def _answer_list(self, contexts, question=None, questions=None, batch_size=1, answer_prefix=None,
                     max_new_tokens=50, **kwargs):
        """One ``{"answer": ...}`` per context, ``batch_size`` contexts at a time in a left-padded batch."""
        if questions is None:
            questions = [question or ""] * len(contexts)
        elif question is not None or len(questions) != len(contexts):
            raise BatchInputError(f"Give question= (asked of every context) or questions= with one question per "
                                  f"context ({len(contexts)}), not {len(questions)} and question={question!r}.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise BatchInputError(f"batch_size={batch_size!r} must be a positive integer.")
        if any(not isinstance(c, str) or not c.strip() for c in contexts):
            raise BatchInputError("A context of the batch is empty: give every context some text.")
        pre, fwd, _ = self._sanitize_parameters(answer_prefix=answer_prefix, max_new_tokens=max_new_tokens, **kwargs)
        pre.pop("questions", None)
        inputs = [self.preprocess(c, [q], **pre) for c, q in zip(contexts, questions)]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        eos = eos_token_ids(self.model)
        answers = []
        for start in range(0, len(inputs), batch_size):
            group = inputs[start : start + batch_size]
            results = generate_batch(
                self.model, [x["context_ids"][0] for x in group], fwd.get("press"),
                questions=[x["questions_ids"][0][0] for x in group], max_new_tokens=fwd.get("max_new_tokens", 50),
                eos_token_ids=eos, chunk_size=fwd.get("prefill_chunk_size"), pad_token_id=pad, stop_at_first=False)
            answers += [{"answer": str(self.tokenizer.decode(r.generated_ids, skip_special_tokens=True))}
                        for r in results]
        return answers

    def _forward(self, input_tensors, max_new_tokens: int = 50, press=None, cache=None, prefill_chunk_size=None):
        chunk_size = prefill_chunk_size
        prefill, decoding = compression_phases(press)
        questions = input_tensors["questions_ids"]
        if decoding and len(questions) > 1:
            if isinstance(press, (DecodingPress, PrefillDecodingPress)):  # kvpress's own error, unchanged
                raise ValueError(
                    "DecodingPress is not compatible with multiple questions. Please specify a single question."
                )
            raise ValueError(
                f"{type(press).__name__} compresses while decoding, so the cache after one answer cannot be "
                "rewound for the next question: ask one question per call."
            )
        cache = DynamicCache() if cache is None else cache
        context_ids = input_tensors["context_ids"].to(input_device(self.model))
        check_prefill_chunk_size(chunk_size, context_ids.shape[1])
        decoder = get_adapter(self.model).decoder(self.model)
        # A press with chunked prefill compacts as the context streams in: feed it chunk by chunk.
        step = max(1, chunk_size or (press_chunk_size(press) if prefill else None) or context_ids.shape[1])
        with apply_press(press_for_chunks(press, chunk_size) if prefill else None, self.model):
            for start in range(0, context_ids.shape[1], step):
                decoder(input_ids=context_ids[:, start : start + step], past_key_values=cache)
            kvpress_logger.debug(f"Context Length: {context_ids.shape[1]}")
            kvpress_logger.debug(f"Compressed Context Length: {cache.get_seq_length()}")

        eos = eos_token_ids(self.model)
        answers = []
        with apply_press(press if decoding else None, self.model):
            for question_ids in questions:
                lengths = [cache.get_seq_length(i) for i in range(len(cache))]
                state = copy.copy(position_state(cache))
                ids = greedy_decode(self.model, question_ids.to(input_device(self.model)), cache, max_new_tokens, eos,
                                    stop_at_first=False)
                answers.append(str(self.tokenizer.decode(ids, skip_special_tokens=True)))
                # Rewind the answer so the next question sees the context only. A press that compressed while
                # decoding leaves each layer cut to its length before the answer, as kvpress's pipeline does.
                self._remove_answer_from_cache(cache, lengths)
                position_state(cache).__dict__.update(state.__dict__)
        return answers


class _AutoModelWithoutLoadingBar(AutoModelForCausalLM):
    """What ``pipeline(..., model=PATH)`` loads with: ``AutoModelForCausalLM`` without transformers' per-tensor
    "Loading weights" bar (noise on every load; :func:`kvpress_ext.load_model` and the commands hide it too)."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            return AutoModelForCausalLM.from_pretrained(*args, **kwargs)
        finally:
            if shown:
                hf_logging.enable_progress_bar()


def answer_from_chunks(pipe, press, context_chunks, question: str | None = None, questions: list[str] | None = None,
                       answer_prefix: str = "", max_new_tokens: int = 50, use_chat_template: bool = True,
                       **unused: Any) -> dict:
    """Answer each question from ``press.fuse`` of the chunks (text or token ids), by greedy decoding.

    The press builds the cache (A³ fuses stored chunk caches); this side makes the prompts: with a chat template the
    template's prefix (system turn, user header) is the fused cache's prefix and each question's suffix (blank line,
    question, assistant header) comes after the chunks; otherwise the store's prefix and the raw question. Returns
    ``{"answer": ...}`` for ``question=`` or ``{"answers": [...]}`` for ``questions=``.
    """
    if unused:
        raise TypeError(f"a3 pipeline does not support {', '.join(unused)}")
    model, tok = pipe.model, pipe.tokenizer
    asked = [question] if question is not None else list(questions or [])
    if not asked:
        raise ValueError("a3 pipeline needs question= or questions=.")
    if not context_chunks:
        raise ValueError("a3: fuse needs at least one chunk.")
    chunks = [list(tok(c, add_special_tokens=False)["input_ids"]) if isinstance(c, str) else c for c in context_chunks]
    eos = eos_token_ids(model)
    last = context_chunks[-1]
    last_text = last if isinstance(last, str) else tok.decode(list(last))
    answers = []
    for q in asked:
        prompt = split_chat_prompt(tok, last_text, q, use_chat_template=use_chat_template)
        prefix_ids = prompt.ids(tok)[0] if prompt.templated else None
        q_ids = tok(prompt.suffix + answer_prefix, add_special_tokens=False)["input_ids"]
        cache, logits = press.fuse(model, chunks, q_ids, prefix_ids)
        first = int(logits[-1].argmax())
        ids = [first]
        if max_new_tokens > 1 and first not in eos:
            with apply_press(None, model):
                ids += greedy_decode(model, torch.tensor([[first]], device=input_device(model)), cache,
                                     max_new_tokens - 1, eos)
        answers.append(str(tok.decode(ids, skip_special_tokens=True)))
    return {"answer": answers[0]} if question is not None else {"answers": answers}


def _register_pipeline() -> None:
    """Take over kvpress's task name (silently: replacing it is the point, not a user mistake)."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        PIPELINE_REGISTRY.register_pipeline(
            "kv-press-text-generation", pipeline_class=KVPressExtPipeline, pt_model=_AutoModelWithoutLoadingBar
        )
    finally:
        hf_logging.set_verbosity(level)


_register_pipeline()
