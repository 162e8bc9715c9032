"""Chat-template prompts split into the three parts a KV-cache method treats differently.

An instruction-tuned model answers only when its prompt is laid out in its chat template: for SmolLM2 (ChatML)
``<|im_start|>system ...<|im_end|>\\n<|im_start|>user\\n{context}\\n\\n{question}<|im_end|>\\n<|im_start|>assistant\\n``.
A press compresses the context but not the question, and A³ fuses the context's chunks between a prefix and a
suffix it recomputes, so every caller needs the same three pieces:

* ``prefix``: everything the template puts before the user's text (system turn, user header);
* ``context``: the context text, unchanged (so separately cached chunks of it stay valid);
* ``suffix``: the blank line, the question and everything after the user's text (end of turn, assistant header).

The user turn is ``context``, a blank line, ``question`` (the separator is shortened when the context already ends
with newlines or the question starts with them). Without a template (or with ``use_chat_template=False``, the
``--no_chat_template`` flag) the prompt is raw text as before: the BOS token text, the context, the question as
given. :func:`split_chat_prompt` is the one place that renders it; the pipeline, ``generate``, ``a3 ask``, the ICL
workflow and the long-context evaluations all call it.
"""

from __future__ import annotations

from dataclasses import dataclass

_CONTEXT_MARK = "\x1eKVPRESS_EXT_CONTEXT\x1e"
_QUESTION_MARK = "\x1eKVPRESS_EXT_QUESTION\x1e"


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


@dataclass(frozen=True)
class ChatPrompt:
    """The three texts of a prompt; ``prefix + context + suffix`` is the whole prompt."""

    prefix: str
    context: str
    suffix: str
    templated: bool

    @property
    def text(self) -> str:
        return self.prefix + self.context + self.suffix

    def __iter__(self):  # prefix, context, suffix = split_chat_prompt(...)
        return iter((self.prefix, self.context, self.suffix))

    def ids(self, tokenizer) -> tuple[list[int], list[int], list[int]]:
        """Token ids of each part, tokenized separately (no special tokens added: the prefix holds them)."""
        return tuple(list(tokenizer(part, add_special_tokens=False)["input_ids"]) if part else []
                     for part in (self.prefix, self.context, self.suffix))


def separator(context: str, question: str) -> str:
    """The newlines that make a blank line between ``context`` and ``question`` ("" when either is empty)."""
    if not context or not question:
        return ""
    have = (len(context) - len(context.rstrip("\n"))) + (len(question) - len(question.lstrip("\n")))
    return "\n" * max(0, 2 - have)


def _bos_text(tokenizer) -> str:
    bos = getattr(tokenizer, "bos_token", None)
    return bos if isinstance(bos, str) else ""


def split_chat_prompt(tokenizer, context: str, question: str = "", *, use_chat_template: bool = True,
                      system: str | None = None) -> ChatPrompt:
    """``(prefix, context, suffix)`` of the prompt asking ``question`` about ``context``.

    With a chat template (and ``use_chat_template``) the user turn is ``context + blank line + question`` and the
    assistant header ends the suffix, so the model's next token starts its answer; ``system`` replaces the
    template's default system prompt where the template takes one. Without, the prefix is the BOS token text (as
    kvpress's pipeline does) and the suffix the question unchanged. ``question=""`` gives a one-part user turn.
    """
    if not (use_chat_template and has_chat_template(tokenizer)):
        return ChatPrompt(_bos_text(tokenizer), context, question, templated=False)
    sep = separator(context, question)
    messages = [{"role": "user", "content": _CONTEXT_MARK + sep + _QUESTION_MARK}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if rendered.count(_CONTEXT_MARK) != 1 or rendered.count(_QUESTION_MARK) != 1:
        raise ValueError("The tokenizer's chat template does not render the user's message verbatim; "
                         "pass use_chat_template=False (--no_chat_template).")
    prefix, rest = rendered.split(_CONTEXT_MARK)
    middle, tail = rest.split(_QUESTION_MARK)
    return ChatPrompt(prefix, context, middle + question + tail, templated=True)


def chat_turn_break(tokenizer) -> str:
    """The text between an assistant reply and the next user message (e.g. ``<|im_end|>\\n<|im_start|>user\\n``),
    for workflows that let the model write in the middle of a long user context (the ICL notes); "" without a
    template."""
    if not has_chat_template(tokenizer):
        return ""
    marks = ("\x1eKVPRESS_EXT_A\x1e", "\x1eKVPRESS_EXT_B\x1e", "\x1eKVPRESS_EXT_C\x1e")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": marks[0]}, {"role": "assistant", "content": marks[1]},
         {"role": "user", "content": marks[2]}], tokenize=False)
    return rendered.split(marks[1])[1].split(marks[2])[0]
