"""Perplexity of a model over a text, without compression and under a press.

Two measures, both per token (so curves and windows come for free):

* :func:`teacher_forced_nll`: the reference. The text is cut into windows of ``context_limit`` tokens and each
  window is scored in one forward pass with the full (uncompressed) context.
* :func:`compressed_nll`: the text is fed incrementally inside ``apply_press(press, model)``, chunk by chunk, and
  every chunk's logits come from a forward over a cache the press compressed after the previous chunk. Prefill-only
  presses are wrapped in :class:`~kvpress_ext.core.chunked_prefill.EveryChunkPress` so they compress after every
  chunk; presses that compress while decoding (``compression_phases(press)[1]``) see the first chunk as prefill
  and the rest of the text token by token (``decode_chunk_size``), as during generation.

Positions always come from the cache (:mod:`kvpress_ext.core.positions`); no loop here computes position ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache

from kvpress_ext.core.adapters import get_adapter
from kvpress_ext.core.apply import apply_press, cache_length_hook
from kvpress_ext.core.chunked_prefill import EveryChunkPress
from kvpress_ext.core.contract import compression_phases, drives_model, positions_follow_cache
from kvpress_ext.core.devices import input_device
from kvpress_ext.core.errors import KVPressExtError, PressParameterError, UnsupportedModelError
from kvpress_ext.core.positions import cache_length
from kvpress_ext.runtime import hub
from kvpress_ext.storage.inputs import read_text_file, shared_dir

DATASETS = ("text", "wikitext", "pg19")
#: Local texts tried, in order, when ``--dataset text`` has no ``--text_file``: offline, no download.
DEFAULT_TEXT_FILES = ("data/wikitext2_test.raw", "data/pride_and_prejudice.txt")


def default_text_file() -> Path:
    """The first of :data:`DEFAULT_TEXT_FILES` in the shared folder (WikiText-2 test, else Pride and Prejudice)."""
    for relative in DEFAULT_TEXT_FILES:
        path = shared_dir() / relative
        if path.is_file():
            return path
    raise KVPressExtError(
        f"No local text in {shared_dir()} ({' or '.join(DEFAULT_TEXT_FILES)}): pass --text_file PATH, set "
        "KVPRESS_EXT_SHARED, or --dataset wikitext to download WikiText-2 from the hub."
    )


# --- data ----------------------------------------------------------------------------------------------------------


def load_text(dataset: str, subset: str | None = None, split: str = "test", sample_idx: int = 0,
              text_file: str | None = None) -> str:
    """The evaluation text: a local file (``dataset="text"``; without ``text_file`` :func:`default_text_file`),
    WikiText (joined split, from the hub) or one PG-19 book (from the hub)."""
    if dataset == "text":
        path = Path(text_file) if text_file else default_text_file()
        if not path.is_file():
            raise KVPressExtError(f"Text file not found: {text_file!r}. Pass an existing file with --text_file.")
        return read_text_file(path, "--text_file")
    if dataset not in DATASETS:
        raise KVPressExtError(f"Unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}.")
    offline = hub.use_cache_only_if_offline()  # offline: the cache only, no retries
    try:
        from datasets import load_dataset

        if dataset == "wikitext":
            data = load_dataset("wikitext", subset or "wikitext-2-raw-v1", split=split)
            return "".join(data["text"])
        data = load_dataset("deepmind/pg19", split=split, streaming=True)
        for i, row in enumerate(data):
            if i == sample_idx:
                return row["text"]
        raise KVPressExtError(f"PG-19 split {split!r} has no book at --sample_idx {sample_idx}.")
    except KVPressExtError:
        raise
    except Exception as exc:
        why = (f"the Hugging Face hub cannot be used ({offline}) and it is not in the local cache" if offline
               else f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}")
        raise KVPressExtError(
            f"Could not load dataset {dataset!r} ({why}). Use --dataset text --text_file PATH (a local UTF-8 file)."
        ) from exc


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids (1, n) of ``text`` (with the tokenizer's BOS if it adds one), cut to ``max_tokens``."""
    if max_tokens is not None:  # tokenize a growing prefix, not a whole book, when only the start is needed
        n_chars = 16 * max_tokens
        while True:
            ids = tokenizer(text[:n_chars], return_tensors="pt").input_ids
            if ids.shape[1] > max_tokens or n_chars >= len(text):
                break
            n_chars *= 4
        ids = ids[:, :max_tokens]
    else:
        ids = tokenizer(text, return_tensors="pt").input_ids
    if ids.shape[1] < 2:
        raise KVPressExtError(f"The text has {ids.shape[1]} token(s); perplexity needs at least 2.")
    return ids


def windows(n_tokens: int, context_limit: int) -> list[tuple[int, int]]:
    """Non-overlapping windows [start, end) of at most ``context_limit`` tokens (a last window of 1 token is
    dropped: it has nothing to predict)."""
    if context_limit < 2:
        raise KVPressExtError(f"--context_limit must be at least 2, got {context_limit}.")
    spans = [(s, min(s + context_limit, n_tokens)) for s in range(0, n_tokens, context_limit)]
    return [(s, e) for s, e in spans if e - s >= 2]


# --- loss ----------------------------------------------------------------------------------------------------------


def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")


@torch.no_grad()
def teacher_forced_nll(model, input_ids: torch.Tensor, context_limit: int = 4096, progress: bool = False):
    """NLL of every predicted token (1-D tensor), each window of ``context_limit`` tokens in one forward pass."""
    device = input_device(model)
    out = []
    for s, e in tqdm(windows(input_ids.shape[1], context_limit), desc="perplexity (press not applied)", disable=not progress):
        ids = input_ids[:, s:e].to(device)
        logits = model(input_ids=ids).logits
        out.append(_token_nll(logits[:, :-1], ids[:, 1:]).cpu())
    return torch.cat(out)


def cache_bytes(cache) -> int:
    """Bytes held by the key/value tensors of a cache (sum over layers)."""
    if cache is None:
        return 0
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def kv_bytes_per_token(model) -> int:
    """Bytes one token adds to an uncompressed cache of ``model`` (keys and values over all layers), measured."""
    device = input_device(model)
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1]], device=device), past_key_values=cache)
    return cache_bytes(cache)


@dataclass
class CompressionPlan:
    """How a press is driven over a growing text (see the module docstring)."""

    press: object
    hooked: object  # what goes into apply_press
    prefill: bool
    decoding: bool
    ratio_mode: str
    extra_hooks: list = field(default_factory=list)


def plan_for(press) -> CompressionPlan:
    """Wrap ``press`` for incremental evaluation; a press that runs the model itself cannot be evaluated so."""
    if press is None:
        return CompressionPlan(None, None, False, False, "none")
    if drives_model(press):
        raise PressParameterError(
            f"{type(press).__name__} runs the model itself on a whole context, so it cannot compress a text that "
            "grows chunk by chunk; evaluate it with --no_ppl_press."
        )
    prefill, decoding = compression_phases(press)
    hooks = [cache_length_hook] if positions_follow_cache(press) else []
    if decoding:
        return CompressionPlan(press, press, prefill, True, "press's own decoding rule", hooks)
    wrapper = EveryChunkPress(press=press)
    return CompressionPlan(press, wrapper, True, False, wrapper.ratio_mode, hooks)


@torch.no_grad()
def compressed_nll(model, input_ids: torch.Tensor, press, context_limit: int = 4096, chunk_size: int = 64,
                   decode_chunk_size: int = 1, progress: bool = False):
    """Per-token NLL with the text fed incrementally under ``press``; returns (nll, stats).

    ``stats``: final cache bytes/length (last window), the largest cache seen, and how the press was driven.
    """
    if chunk_size < 1 or decode_chunk_size < 1:
        raise KVPressExtError("--chunk_size and --decode_chunk_size must be positive integers.")
    plan = plan_for(press)
    adapter = get_adapter(model)
    decoder = adapter.decoder(model)
    device = input_device(model)
    spans = windows(input_ids.shape[1], context_limit)
    out, peak_bytes, peak_len = [], 0, 0
    cache = None
    bar = tqdm(total=sum(e - s for s, e in spans), desc="perplexity (press applied)", disable=not progress)
    for s, e in spans:
        cache = DynamicCache()
        ids = input_ids[:, s:e].to(device)
        handles = [decoder.register_forward_hook(h, with_kwargs=True) for h in plan.extra_hooks]
        try:
            with apply_press(plan.hooked, model):
                pos, first = 0, True
                while pos < ids.shape[1]:
                    step = chunk_size if (first or not plan.decoding) else decode_chunk_size
                    chunk = ids[:, pos:pos + step]
                    logits = model(input_ids=chunk, past_key_values=cache).logits
                    nxt = ids[:, pos + 1:pos + step + 1]
                    if nxt.shape[1]:
                        out.append(_token_nll(logits[:, : nxt.shape[1]], nxt).cpu())
                    peak_bytes = max(peak_bytes, cache_bytes(cache))
                    peak_len = max(peak_len, cache_length(cache))
                    pos += chunk.shape[1]
                    first = False
                    bar.update(chunk.shape[1])
        finally:
            for h in handles:
                h.remove()
    bar.close()
    stats = {
        "cache_bytes_end": cache_bytes(cache), "cache_len_end": cache_length(cache),
        "tokens_end": spans[-1][1] - spans[-1][0] if spans else 0,
        "cache_bytes_peak": peak_bytes, "cache_len_peak": peak_len, "ratio_mode": plan.ratio_mode,
        "compresses_at_prefill": plan.prefill, "compresses_while_decoding": plan.decoding,
    }
    return torch.cat(out), stats


def segment_curve(nll: torch.Tensor, segment: int = 512) -> list[dict]:
    """Mean NLL and perplexity of every ``segment`` predicted tokens (the last segment may be shorter)."""
    curve = []
    for s in range(0, nll.numel(), segment):
        part = nll[s:s + segment]
        loss = float(part.mean())
        curve.append({"start": s, "end": s + part.numel(), "loss": loss, "ppl": math.exp(loss)})
    return curve


def perplexity_summary(nll: torch.Tensor, segment: int = 512) -> dict:
    loss = float(nll.double().mean())
    return {"n_scored_tokens": int(nll.numel()), "loss": loss, "ppl": math.exp(loss),
            "curve": segment_curve(nll, segment)}


def check_supported(model) -> None:
    """Raise :class:`UnsupportedModelError` (one line) if no adapter drives ``model``."""
    try:
        get_adapter(model)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(str(exc).split(". To add")[0] + ".") from exc
