"""Text generation under any press (the library behind ``kvpress-ext generate``).

The prompt is prefilled through the press (in chunks of the press's ``prefill_chunk_size`` when it has
one, so ``lazy_streaming`` compacts while a prompt longer than its cap streams in), then tokens are
decoded one forward at a time inside :func:`~kvpress_ext.core.apply.apply_press`, for the phases the press
compresses in (:func:`~kvpress_ext.core.contract.compression_phases`). Greedy by default; nucleus sampling
with a seeded ``torch.Generator`` when ``--temperature`` > 0. The cache length is recorded after every
forward pass, so the reported peak is what the cache holds between passes (bounded by ``cap_total`` for
``lazy_streaming``, however many tokens are generated).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from kvpress_ext.core.adapters import get_adapter
from kvpress_ext.core.apply import apply_press
from kvpress_ext.core.chunked_prefill import check_prefill_chunk_size, press_for_chunks
from kvpress_ext.core.contract import compression_phases
from kvpress_ext.core.contract import prefill_chunk_size as press_chunk_size
from kvpress_ext.core.devices import synchronize
from kvpress_ext.core.errors import KVPressExtError
from kvpress_ext.core.positions import cache_length
from kvpress_ext.core.tokens import eos_token_ids
from kvpress_ext.presses.lazy_streaming import chunked_prefill
from kvpress_ext.runtime.batched import generate_batch


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy when ``temperature <= 0``, else nucleus sampling from ``logits / temperature`` with ``generator``."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cut = sorted_p.cumsum(-1) - sorted_p >= top_p  # drop tokens once the mass before them reaches top_p
        sorted_p[cut] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


class GenerateInputError(KVPressExtError):
    """Bad ``generate`` input: missing model path, empty prompt, a sampling setting out of range."""


@dataclass
class Generation:
    """Generated token ids and what it cost (times in seconds, lengths in cache entries per layer)."""

    prompt_tokens: int
    generated_ids: list[int] = field(default_factory=list)
    ttft_s: float = 0.0
    decode_s: float = 0.0
    cache_len_final: int = 0
    cache_len_peak: int = 0
    stopped_at_eos: bool = False

    @property
    def decode_tok_per_s(self) -> float:
        steps = len(self.generated_ids) - 1  # the first token comes from the prefill
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")


@contextmanager
def _record_cache_length(model, cache, result: Generation):
    """Record the cache length after each forward pass (registered last, so after any compaction)."""

    def hook(module, args, kwargs, output):
        result.cache_len_peak = max(result.cache_len_peak, cache_length(cache))

    handle = get_adapter(model).decoder(model).register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def generate_ids(model, input_ids: torch.Tensor, press=None, *, max_new_tokens: int = 100, temperature: float = 0.0,
                 top_p: float = 1.0, generator: torch.Generator | None = None, stop_at_eos: bool = True,
                 on_token=None, progress: bool = False, prefill_chunk_size: int | None = None) -> Generation:
    """Prefill ``input_ids`` (1 x n) through ``press`` and decode up to ``max_new_tokens`` tokens.

    ``on_token(id)`` is called for every new token as it is produced (for streaming). With ``stop_at_eos``
    generation ends after an EOS token (included in the ids, as ``model.generate`` does). ``prefill_chunk_size``
    feeds the prompt in chunks of that many tokens, compressing after each one.
    """
    device = input_ids.device
    check_prefill_chunk_size(prefill_chunk_size, int(input_ids.shape[1]))
    prefill_phase, decoding_phase = compression_phases(press)
    chunk = prefill_chunk_size or (press_chunk_size(press) if prefill_phase else None)
    eos = eos_token_ids(model) if stop_at_eos else set()
    cache = DynamicCache()
    result = Generation(prompt_tokens=int(input_ids.shape[1]))

    def take(logits):
        token = sample_token(logits[0, -1], temperature, top_p, generator)
        result.generated_ids.append(token)
        if on_token is not None:
            on_token(token)
        bar.update(1)
        return token

    bar = tqdm(total=max_new_tokens, desc="generate", unit="tok", disable=not progress, leave=False)
    synchronize(device)
    t0 = time.perf_counter()
    hooked = press_for_chunks(press, prefill_chunk_size) if prefill_phase else None
    with apply_press(hooked, model), _record_cache_length(model, cache, result):
        out = chunked_prefill(model, input_ids, cache, chunk or input_ids.shape[1])
        token = take(out.logits)
    synchronize(device)
    result.ttft_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    with apply_press(press if decoding_phase else None, model), _record_cache_length(model, cache, result):
        while len(result.generated_ids) < max_new_tokens and token not in eos:
            out = model(input_ids=torch.tensor([[token]], device=device), past_key_values=cache, logits_to_keep=1)
            token = take(out.logits)
    synchronize(device)
    result.decode_s = time.perf_counter() - t1
    bar.close()
    result.stopped_at_eos = token in eos
    result.cache_len_final = cache_length(cache)
    return result


def generate_many(model, prompts, press=None, *, batch_size: int = 1, max_new_tokens: int = 100,
                  stop_at_eos: bool = True, prefill_chunk_size: int | None = None) -> list[list[int]]:
    """Greedy generation for several prompts (token id lists), ``batch_size`` at a time in left-padded batches
    (each compressed as if alone, :mod:`kvpress_ext.runtime.batched`); one list of ids per prompt."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise GenerateInputError(f"batch_size must be a positive integer, got {batch_size!r}.")
    eos = eos_token_ids(model) if stop_at_eos else set()
    pad = getattr(model.generation_config, "pad_token_id", None)
    out = []
    for start in range(0, len(prompts), batch_size):
        group = prompts[start : start + batch_size]
        out += [r.generated_ids for r in generate_batch(
            model, group, press, max_new_tokens=max_new_tokens, eos_token_ids=eos, chunk_size=prefill_chunk_size,
            pad_token_id=pad if isinstance(pad, int) else 0)]
    return out
