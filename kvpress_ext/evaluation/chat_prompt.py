"""Split a long-context prompt into the part a press compresses and the part fed after it.

Local stand-in until the shared chat-template function (``kvpress_ext/chat.py``) lands: swap
:func:`render_user_turn` for it and nothing else changes. The user turn is ``context + "\\n\\n" + question``
inside the model's chat template (a plain ``BOS + ...`` when the tokenizer has none), as kvpress's pipeline
builds it.

Two modes, as in kvpress's evaluation:

* question-agnostic (default): the press compresses ``template head + context``; the question, the end of
  the user turn and the assistant header come after compression (the press cannot see the question);
* question-aware: the press compresses ``template head + context + question``; only the end of the user
  turn and the assistant header come after.
"""

from __future__ import annotations

from dataclasses import dataclass

_CONTEXT = "\x00CONTEXT\x00"
_QUESTION = "\x00QUESTION\x00"
SEPARATOR = "\n\n"


def render_user_turn(tokenizer, use_chat_template: bool = True) -> tuple[str, str, str]:
    """(head, middle, tail): the prompt is ``head + context + middle + question + tail``."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": _CONTEXT + SEPARATOR + _QUESTION}],
                                             add_generation_prompt=True, tokenize=False)
        head, rest = text.split(_CONTEXT)
        middle, tail = rest.split(_QUESTION)
        return head, middle, tail
    return tokenizer.bos_token or "", SEPARATOR, "\n"


@dataclass
class PromptParts:
    compressed: str  # what the press sees before the answer is asked for
    rest: str  # fed after compression (question-agnostic: the question; always: the assistant header)
    context_start: int  # character offset of the context inside ``compressed``
    chat_template: bool


def split_prompt(tokenizer, context: str, question: str, answer_prefix: str = "", query_aware: bool = False,
                 use_chat_template: bool = True) -> PromptParts:
    head, middle, tail = render_user_turn(tokenizer, use_chat_template)
    templated = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
    if query_aware:
        return PromptParts(head + context + middle + question, tail + answer_prefix, len(head), templated)
    return PromptParts(head + context, middle + question + tail + answer_prefix, len(head), templated)
