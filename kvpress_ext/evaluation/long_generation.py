"""What the long-generation evaluation measures for R-KV and other decode-time presses.

Two measures, each against the full (uncompressed) cache, for every method at every token budget:

* :func:`nll_cell` (part i): teacher-forced NLL of a long continuation. A ``context`` of text is prefilled
  through the press, then the continuation is fed token by token (or ``decode_chunk_size`` tokens per
  forward) with the press active, so each token is scored from the cache the press compressed while
  "decoding" (the incremental scorer of :func:`kvpress_ext.evaluation.perplexity.compressed_nll`).
* :func:`generation_cell` (part ii): greedy generation with :func:`kvpress_ext.runtime.generate.generate_ids` (the
  pipeline's own generation loop, so the press is applied exactly as there), the cache length after every
  generated token, and :func:`agreement` of the tokens with the full cache's generation.

Methods: ``full`` (no press), ``rkv`` (budget = ``budget``), ``lazy_streaming`` (``cap_total`` = budget) and
kvpress's ``DecodingPress`` (``target_size`` = budget) around ``snapkv`` and ``streaming_llm``, each in a
:class:`~kvpress_ext.core.temporal_order.TemporalOrderPress` (DecodingPress compresses the same cache again, and
kvpress leaves kept entries in score order). ``rkv`` and the
decoding presses let the cache grow by up to ``compression_interval`` tokens between compressions (snapkv's
observation window is ``min(64, compression_interval // 2)`` queries); ``lazy_streaming`` never exceeds its cap (slack
``min(64, budget // 4)``). :mod:`kvpress_ext.evaluation.runners.long_generation` runs each (method, budget) as a
cell of a sweep.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import torch

from kvpress_ext.core.adapters import get_adapter
from kvpress_ext.core.errors import KVPressExtError
from kvpress_ext.core.positions import cache_length
from kvpress_ext.core.registry import NoCompressionWarning, get_press, press_info
from kvpress_ext.core.temporal_order import in_temporal_order
from kvpress_ext.core.tokens import eos_token_ids
from kvpress_ext.evaluation.perplexity import compressed_nll
from kvpress_ext.runtime.chat import split_chat_prompt
from kvpress_ext.runtime.generate import generate_ids

METHODS = ("full", "rkv", "lazy_streaming", "decoding_snapkv", "decoding_streaming_llm")
#: A prompt that asks for a long answer, so 1,000 generated tokens are mostly one text.
DEFAULT_GEN_PROMPT = ("Write a long, detailed story (at least 2,000 words) about a young woman who leaves her village "
                      "to become a lighthouse keeper on a remote island. Describe the island, the people she meets, "
                      "the storms, and how she changes over the years, chapter by chapter.")


class LongGenerationInputError(KVPressExtError):
    """Bad input to the long-generation evaluation (a budget <= 0, an unknown method, a text too short)."""


@dataclass(frozen=True)
class Cell:
    method: str
    budget: int | None  # None for ``full``

    @property
    def name(self) -> str:
        return self.method if self.budget is None else f"{self.method}_b{self.budget}"


def check_budgets(budgets) -> list[int]:
    budgets = list(budgets)
    if not budgets or any(isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in budgets):
        raise LongGenerationInputError(f"--budgets {budgets} must be positive integers (tokens kept in the cache).")
    return budgets


def cells(methods, budgets, first_budget: int | None = None) -> list[Cell]:
    """``full`` once (first: every other cell is compared with it), then every other method at every budget,
    ``first_budget``'s cells first (a run stopped by a time limit has the most wanted cells)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise LongGenerationInputError(f"Unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}.")
    budgets = sorted(check_budgets(budgets), key=lambda b: b != first_budget)
    out = [Cell("full", None)] if "full" in methods else []
    return out + [Cell(m, b) for b in budgets for m in methods if m != "full"]


def build_press(method: str, budget: int | None, compression_interval: int = 128, n_sink: int = 4, slack: int = 64):
    """The press of ``method`` holding ``budget`` tokens (None for ``full``)."""
    if method == "full":
        return None
    check_budgets([budget])
    if method == "rkv":
        return get_press("rkv", budget=budget, compression_interval=compression_interval)
    if method == "lazy_streaming":
        # small caps (tests) keep most of the cap as the recent window
        return get_press("lazy_streaming", cap_total=budget, n_sink=n_sink, slack=min(slack, budget // 4))
    if method in ("decoding_snapkv", "decoding_streaming_llm"):
        # snapkv scores with the queries buffered since the last compression
        extra = {"window_size": min(64, compression_interval // 2)} if method == "decoding_snapkv" else {}
        with warnings.catch_warnings():  # ratio 0: DecodingPress sets the ratio of each compression itself
            warnings.simplefilter("ignore", NoCompressionWarning)
            base = get_press(method.removeprefix("decoding_"), compression_ratio=0.0, **extra)
        # DecodingPress compresses the same cache every interval: the kept entries must stay in token order
        return press_info("decoding").cls(base_press=in_temporal_order(base), target_size=budget,
                                          compression_interval=compression_interval)
    raise LongGenerationInputError(f"Unknown method {method!r}; choose from {', '.join(METHODS)}.")


# --- part (i): teacher-forced NLL --------------------------------------------------------------------------------


def nll_cell(model, input_ids: torch.Tensor, context: int, press, decode_chunk_size: int = 1,
             segment: int = 256) -> dict:
    """NLL of the tokens after the first ``context`` ones of ``input_ids`` (1 x n), under ``press``.

    The context is prefilled in one forward (through the press), the continuation is fed ``decode_chunk_size``
    tokens per forward (one chunk of ``context`` tokens at a time without a press: the same numbers, faster)."""
    n = input_ids.shape[1]
    if not 1 <= context < n - 1:
        raise LongGenerationInputError(f"--context {context} must be at least 1 and leave at least 2 tokens to score "
                                       f"(the text has {n} tokens).")
    start = time.perf_counter()
    nll, stats = compressed_nll(model, input_ids, press, context_limit=n, chunk_size=context,
                                decode_chunk_size=decode_chunk_size)
    seconds = time.perf_counter() - start
    cont = nll[context - 1:]  # nll[j] scores token j + 1: the continuation starts at token ``context``
    mean = float(cont.double().mean())
    return {
        "mean_nll": mean, "ppl": math.exp(mean), "n_scored_tokens": int(cont.numel()), "context": context,
        "cache_len_end": stats["cache_len_end"], "cache_len_peak": stats["cache_len_peak"], "seconds": seconds,
        "segment": segment,
        "segment_nll": [float(cont[s:s + segment].double().mean()) for s in range(0, cont.numel(), segment)],
    }


# --- part (ii): greedy generation ----------------------------------------------------------------------------------


def generation_cell(model, prompt_ids: torch.Tensor, press, gen_tokens: int) -> dict:
    """Greedy generation of exactly ``gen_tokens`` tokens (EOS does not stop it; its first index is recorded)
    and the cache length after every generated token (after the press compressed, if it did)."""
    seen = {}
    trace: list[int] = []

    def remember(module, args, kwargs):  # the cache generate_ids builds is only reachable through the model call
        seen["cache"] = kwargs.get("past_key_values", seen.get("cache"))

    handle = get_adapter(model).decoder(model).register_forward_pre_hook(remember, with_kwargs=True)
    try:
        start = time.perf_counter()
        gen = generate_ids(model, prompt_ids, press, max_new_tokens=gen_tokens, stop_at_eos=False,
                           on_token=lambda _tok: trace.append(cache_length(seen["cache"])))
        seconds = time.perf_counter() - start
    finally:
        handle.remove()
    eos = eos_token_ids(model)
    first_eos = next((i for i, t in enumerate(gen.generated_ids) if t in eos), None)
    return {"prompt_tokens": gen.prompt_tokens, "generated_ids": gen.generated_ids, "cache_len_trace": trace,
            "cache_len_end": gen.cache_len_final, "cache_len_peak": max(trace) if trace else 0,
            "first_eos_index": first_eos, "seconds": seconds, "decode_tok_per_s": gen.decode_tok_per_s}


def agreement(ids: list[int], reference: list[int]) -> dict:
    """Fraction of the reference's positions where ``ids`` has the same token, and the first position where they
    differ (None: identical over the reference's length)."""
    n = len(reference)
    if n == 0:
        return {"agreement": 1.0, "first_divergence": None}
    same = [i < len(ids) and ids[i] == reference[i] for i in range(n)]
    first = next((i for i, s in enumerate(same) if not s), None)
    return {"agreement": sum(same) / n, "first_divergence": first}


def chat_prompt_ids(tokenizer, prompt: str, use_chat_template: bool = True) -> torch.Tensor:
    """(1, n) ids of ``prompt`` as a user turn of the model's chat template (raw text after BOS without one)."""
    prefix, context, suffix = split_chat_prompt(tokenizer, prompt, use_chat_template=use_chat_template).ids(tokenizer)
    return torch.tensor([prefix + context + suffix])
