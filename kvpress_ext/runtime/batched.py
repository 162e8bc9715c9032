"""Several prompts at once: a left-padded batch through any press whose contract claims batches.

Each sequence is compressed as if it were alone (:mod:`kvpress_ext.core.batch`), with its own positions and its
own tokens in the attention mask (:mod:`kvpress_ext.core.positions`); a press that cannot is refused before the
model runs. ``chunk_size`` (``prefill_chunk_size``) feeds the contexts in chunks and compresses after each one
(:func:`kvpress_ext.core.chunked_prefill.press_for_chunks`); chunks are counted from the end of the contexts
(:func:`end_aligned_chunks`). Greedy decoding; a sequence stops at its own EOS while
the others go on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from kvpress_ext.core.apply import apply_press, check_batches
from kvpress_ext.core.chunked_prefill import check_prefill_chunk_size, press_for_chunks
from kvpress_ext.core.contract import compression_phases, contract_of, prefill_chunk_size
from kvpress_ext.core.devices import input_device
from kvpress_ext.core.positions import BatchInputError


@dataclass
class BatchAnswer:
    """One sequence's greedy tokens and the logits its first token was chosen from (float32, on the CPU)."""

    generated_ids: list
    first_logits: torch.Tensor


def model_window(model) -> int | None:
    """Positions the model was trained for (``max_position_embeddings``), if its config says."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def check_sequences(sequences, model, press=None, what: str = "context") -> None:
    """Every sequence has at least one token and, unless the press bounds positions, fits the model's window."""
    if not sequences:
        raise BatchInputError(f"No {what}s given: pass a list with at least one {what}.")
    bounded = press is not None and (contract_of(press).chunked_prefill or contract_of(press).positions_follow_cache)
    window = model_window(model)
    for i, seq in enumerate(sequences, 1):
        n = len(seq)
        if n == 0:
            raise BatchInputError(f"{what} {i} of the batch is empty: give every {what} at least one token.")
        if window and not bounded and n > window:
            raise BatchInputError(f"{what} {i} has {n} tokens, more than the model's window of {window}: shorten it, "
                                  "or use a press that keeps positions inside the window (e.g. lazy_streaming).")


def left_pad(sequences, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), each (B, longest), pads on the left."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(sequences):
        seq = torch.as_tensor(seq, dtype=torch.long, device=device).reshape(-1)
        if seq.numel():
            ids[i, width - seq.numel() :] = seq
            mask[i, width - seq.numel() :] = 1
    return ids, mask


def end_aligned_chunks(length: int, chunk: int) -> list[tuple[int, int]]:
    """(start, end) of each chunk, the last ending at ``length`` and only the first shorter than ``chunk``.

    Every sequence of a left-padded batch ends at the last column, so chunks counted from the end cut each one
    where they would cut it alone: a press that compresses per chunk sees the same chunks in and out of a batch.
    """
    first = length % chunk or chunk
    return [(0, first)] + [(s, s + chunk) for s in range(first, length, chunk)]


@torch.no_grad()
def generate_batch(model, prompts, press=None, *, questions=None, max_new_tokens: int = 50, eos_token_ids=(),
                   chunk_size: int | None = None, pad_token_id: int = 0,
                   stop_at_first: bool = True) -> list[BatchAnswer]:
    """Prefill ``prompts`` (token id lists) through ``press``, then each sequence's question if given, and decode
    greedily; one :class:`BatchAnswer` per prompt. ``stop_at_first=False`` does not stop on a first EOS token (as
    kvpress's pipeline)."""
    check_sequences(prompts, model, press)
    if questions is not None:
        if len(questions) != len(prompts):
            raise BatchInputError(f"{len(questions)} questions for {len(prompts)} contexts: give one per context.")
        check_sequences(questions, model, None, "question")
    uneven = len({len(p) for p in prompts}) > 1 or (questions is not None and len({len(q) for q in questions}) > 1)
    check_batches(press, uneven)
    device = input_device(model)
    ids, mask = left_pad(prompts, pad_token_id, device)
    check_prefill_chunk_size(chunk_size, ids.shape[1])
    prefill, decoding = compression_phases(press)
    chunk = chunk_size or (prefill_chunk_size(press) if prefill else None) or ids.shape[1]
    cache = DynamicCache()
    with apply_press(press_for_chunks(press, chunk_size) if prefill else None, model):
        for start, end in end_aligned_chunks(ids.shape[1], chunk):
            out = model(input_ids=ids[:, start:end], attention_mask=mask[:, :end], past_key_values=cache,
                        logits_to_keep=1)
    eos = set(eos_token_ids)
    batch = ids.shape[0]
    generated = [[] for _ in range(batch)]
    with apply_press(press if decoding else None, model):
        if questions is not None:
            q_ids, q_mask = left_pad(questions, pad_token_id, device)
            mask = torch.cat([mask, q_mask], dim=1)
            out = model(input_ids=q_ids, attention_mask=mask, past_key_values=cache, logits_to_keep=1)
        first = out.logits[:, -1].float().cpu()
        done = [False] * batch
        token = out.logits[:, -1].argmax(dim=-1)
        for step in range(max_new_tokens):
            for i, t in enumerate(token.tolist()):
                if not done[i]:
                    generated[i].append(t)
                    done[i] = t in eos and (stop_at_first or step > 0)
            if all(done) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(input_ids=token[:, None], attention_mask=mask, past_key_values=cache, logits_to_keep=1)
            token = out.logits[:, -1].argmax(dim=-1)
    return [BatchAnswer(generated[i], first[i]) for i in range(batch)]
