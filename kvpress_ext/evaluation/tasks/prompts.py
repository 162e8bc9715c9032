"""A cell's prompt: its sample (needle or record task), the chat template around it, and the cut between what the
press compresses and what is fed after it; the lengths a model can hold."""

from __future__ import annotations

from dataclasses import dataclass

from kvpress_ext.evaluation import longcontext as lc
from kvpress_ext.evaluation.tasks.needle import needle_sample
from kvpress_ext.evaluation.tasks.records import file_sample
from kvpress_ext.runtime.chat import separator, split_chat_prompt


@dataclass
class PromptParts:
    compressed: str  # what the press sees before the answer is asked for
    rest: str  # fed after compression (question-agnostic: the question; always: the assistant header)
    context_start: int  # character offset of the context inside ``compressed``
    chat_template: bool


def split_prompt(tokenizer, context: str, question: str, answer_prefix: str = "", query_aware: bool = False,
                 use_chat_template: bool = True) -> PromptParts:
    """The prompt of :func:`kvpress_ext.runtime.chat.split_chat_prompt` (user turn = context, blank line, question) cut
    where the press stops compressing. Two modes, as in kvpress's evaluation: question-agnostic (default), the
    press compresses ``prefix + context`` and the question comes after; question-aware, it compresses
    ``prefix + context + blank line + question`` and only the end of the turn and the assistant header come after.
    Without a template the blank line is kept (raw ``BOS + context + blank line + question``)."""
    sep = separator(context, question)  # in the context part: split_chat_prompt then adds no other separator
    prompt = split_chat_prompt(tokenizer, context + sep, question, use_chat_template=use_chat_template)
    cut = prompt.suffix.find(question) + len(question) if query_aware and question else 0
    head = prompt.prefix + context
    compressed = head + (sep + prompt.suffix[:cut] if query_aware else "")
    rest = ("" if query_aware else sep) + prompt.suffix[cut:]
    if answer_prefix and not prompt.templated and not (compressed + rest)[-1:].isspace():
        answer_prefix = " " + answer_prefix  # completion-style: "...? The pass key is", not "...?The pass key is"
    return PromptParts(compressed, rest + answer_prefix, len(prompt.prefix), prompt.templated)


def context_limit(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def ids_of(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def cell_prompt(tokenizer, params: dict):
    """(sample, prompt parts, compressed ids, ids after them) of a cell: what :func:`kvpress_ext.evaluation.runners.longcontext.run_cell` feeds the model,
    and what :func:`check_lengths` measures before a grid starts."""
    sample = (needle_sample(tokenizer, params) if params["source"] == "needle" else file_sample(params))
    parts = split_prompt(tokenizer, sample.context, sample.question, sample.meta.get("answer_prefix", ""),
                         params["query_aware"], params.get("chat_template", True))
    compressed_ids, rest_ids = ids_of(tokenizer, parts.compressed), ids_of(tokenizer, parts.rest)
    if params.get("max_context_tokens") and len(compressed_ids) > params["max_context_tokens"]:
        half = params["max_context_tokens"] // 2  # LongBench keeps the head and the tail
        compressed_ids = compressed_ids[:half] + compressed_ids[-half:]
    return sample, parts, compressed_ids, rest_ids


def check_lengths(model, tokenizer, samples: list[dict], settings: dict, modes: list[bool]) -> None:
    """Lengths the model cannot hold: one line naming the longest that fits.

    Measured on the real prompt of every sample in every mode (chat template, haystack, needle, question, answer
    prefix) plus ``max_new_tokens``, as the runner builds it, so a grid never starts cells that can only
    fail."""
    limit = context_limit(model)
    if not limit:
        return

    def needed(n: int, group: list[dict]) -> int:  # the most tokens any sample of ``group`` needs at length n
        return max(len(c) + len(r) + settings["max_new_tokens"]
                   for sample in group for query_aware in modes
                   for _, _, c, r in [cell_prompt(tokenizer, {**settings, **sample, "length": n,
                                                               "query_aware": query_aware})])

    by_length: dict[int, list[dict]] = {}
    for sample in samples:
        by_length.setdefault(sample["length"], []).append(sample)
    too_long = [n for n, group in by_length.items() if needed(n, group) > limit]
    if too_long:
        group = by_length[min(too_long)]
        worst = [max(group, key=lambda sample: needed(min(too_long), [sample]))]
        lo, hi = 16, min(too_long) - 1  # the longest length at which the longest prompt fits (bisection) ...
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if needed(mid, worst) <= limit else (lo, mid - 1)
        while lo > 16 and needed(lo, group) > limit:  # ... and then every sample does
            lo -= 1
        raise lc.InputError(f"--lengths {' '.join(map(str, too_long))} exceed the model's context of {limit} tokens "
                            f"(with the prompt around the text, the question and the answer): use lengths up to {lo}")

