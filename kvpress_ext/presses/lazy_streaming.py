"""Lazy-pruning StreamingLLM: attention sinks + a recent window, compacted once per ``slack`` tokens."""

from __future__ import annotations

import functools
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from kvpress import BasePress

from kvpress_ext.core.adapters import get_adapter
from kvpress_ext.core.apply import apply_press
from kvpress_ext.core.contract import PressContract
from kvpress_ext.core.errors import PressParameterError
from kvpress_ext.core.positions import set_next_position
from kvpress_ext.core.registry import register_press


class _DropMaxLengthReminder(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "predefined maximum length" not in record.getMessage()


@contextmanager
def _without_max_length_reminder():
    logger = logging.getLogger("transformers.generation.stopping_criteria")
    drop = _DropMaxLengthReminder()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


@register_press("lazy_streaming")
@dataclass
class LazyStreamingPress(BasePress):
    """Lazy-Pruning StreamingLLM: attention sinks and a recent window, compacted once every ``slack`` tokens.

    StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with Attention Sinks",
    arXiv 2309.17453) with lazy pruning: the cache keeps ``n_sink`` first tokens and the most recent
    ``window`` tokens, and RoPE positions are indices in the cache (keys re-rotated when tokens leave).

    Eager StreamingLLM evicts and re-rotates the whole window at every token. Here the cache may grow
    ``slack`` tokens past the cap ``n_sink + window`` before one compaction evicts back to the cap and
    re-rotates the kept recent keys to positions ``n_sink .. n_sink + window - 1`` (one rotation by a
    constant shift), so the eviction cost is paid once per ``slack`` tokens. Between forward passes the
    cache never holds more than ``n_sink + window + slack`` (= ``cap_total``) tokens; the next token's
    RoPE position is its index in the cache, as in StreamingLLM.

    Compresses at prefill and during decoding. Feed long prompts with :func:`chunked_prefill` so the
    cache is compacted as the prompt streams in.

    Parameters
    ----------
    n_sink : int
        First tokens always kept (attention sinks), >= 0. Default 4 as in the paper.
    window : int, optional
        Recent tokens kept after a compaction, >= 1. Give either ``window`` or ``cap_total``.
    slack : int
        Tokens allowed past the cap before compacting, >= 0. ``slack=0`` is eager StreamingLLM.
    cap_total : int, optional
        Most tokens the cache ever holds between forward passes; sets ``window = cap_total - n_sink - slack``.
    """

    n_sink: int = 4
    window: int | None = None
    slack: int = 64
    cap_total: int | None = None
    #: Compacts the whole cache once per forward, at prefill (chunk by chunk) and while decoding; ``cap_total`` or
    #: ``window`` given explicitly wins over a compression ratio.
    contract: ClassVar[PressContract] = PressContract(
        prefill=True, decoding=True, whole_cache=True, chunked_prefill=True, budget_parameters=("cap_total", "window"),
        batches=True)

    def __post_init__(self):
        for name in ("n_sink", "slack"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PressParameterError(f"lazy_streaming: {name}={value!r} is invalid; it must be an integer >= 0.")
        if (self.window is None) == (self.cap_total is None):
            raise PressParameterError(
                "lazy_streaming: give exactly one of `window` (recent tokens kept after a compaction, >= 1) or "
                f"`cap_total` (most tokens in the cache, >= n_sink + slack + 1); got window={self.window!r}, "
                f"cap_total={self.cap_total!r}."
            )
        if self.cap_total is not None:
            if isinstance(self.cap_total, bool) or not isinstance(self.cap_total, int):
                raise PressParameterError(f"lazy_streaming: cap_total={self.cap_total!r} must be an integer.")
            if self.cap_total < self.n_sink + self.slack + 1:
                raise PressParameterError(
                    f"lazy_streaming: cap_total={self.cap_total} is too small for n_sink={self.n_sink} and "
                    f"slack={self.slack}: it must be >= n_sink + slack + 1 = {self.n_sink + self.slack + 1} "
                    "so that at least one recent token is kept."
                )
        elif isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise PressParameterError(f"lazy_streaming: window={self.window!r} is invalid; it must be an integer >= 1.")
        self._rerotate = None
        self._layers = None

    @classmethod
    def from_compression_ratio(cls, compression_ratio: float, context_length: int, **params):
        """The press at the KV budget of a ratio press: ``cap_total = round((1 - compression_ratio) *
        context_length)`` (at least ``n_sink + 2``), ``slack = cap_total // 8`` unless given (at least 1), so
        ``window = cap_total - n_sink - slack``. E.g. ratio 0.5 over 4,096-token windows: cap_total 2048, slack
        256, window 1788. Lets sweeps compare it with ratio-based presses at one memory budget."""
        cap = max(params.get("n_sink", 4) + 2, round((1 - compression_ratio) * context_length))
        params.setdefault("slack", max(1, cap // 8))
        return cls(cap_total=cap, **params)

    # ---- derived sizes ------------------------------------------------------------------------------
    @property
    def recent(self) -> int:
        """Recent tokens kept after a compaction."""
        return self.window if self.window is not None else self.cap_total - self.n_sink - self.slack

    @property
    def cap(self) -> int:
        """Cache length right after a compaction: sinks + recent window."""
        return self.n_sink + self.recent

    @property
    def max_cache(self) -> int:
        """Longest the cache gets between forward passes (= cap_total)."""
        return self.cap + self.slack

    @property
    def prefill_chunk_size(self) -> int:
        """Chunk length for :func:`chunked_prefill`: one compaction per chunk at most."""
        return max(1, self.slack)

    # ---- kvpress / apply_press plumbing -------------------------------------------------------------
    @contextmanager
    def __call__(self, model):
        """``with press(model): model.generate(...)``. transformers' reminder that a generation "has exceeded the
        model's predefined maximum length" is dropped inside: positions here are cache indices, below ``cap_total``,
        so going past that length is what this press is for."""
        with apply_press(self, model), _without_max_length_reminder():
            yield

    def post_init_from_model(self, model):
        adapter = get_adapter(model)
        self._rerotate = functools.partial(adapter.rerotate_keys, model)
        self._layers = adapter.compressed_layers(model)  # Gemma 3: not its sliding-window layers

    def reset(self):
        self._rerotate = None

    def after_forward(self, cache) -> None:
        """Once per forward pass (see :func:`kvpress_ext.core.apply.manages_whole_cache`): compact every layer
        the model lets presses compress when the cache has grown past ``cap_total``, and put the next token right
        after the kept ones."""
        layers = getattr(self, "_layers", None) or range(len(cache.layers))
        length = cache.layers[layers[0]].keys.shape[-2]
        if length > self.max_cache:
            for i in layers:
                self._compact(cache.layers[i], length, i)
            set_next_position(cache, self.cap)

    def _compact(self, layer, length: int, layer_idx: int) -> None:
        """Keep sinks + the last ``recent`` tokens; shift the recent keys' RoPE by -(evicted count)."""
        s, w = self.n_sink, self.recent
        keys, values = layer.keys, layer.values
        shift = length - w - s  # recent token at index i moves to i - shift
        recent_keys = keys[..., length - w :, :]
        zero = torch.zeros(1, device=keys.device)
        recent_keys = self._rerotate(recent_keys, zero + shift, zero, layer=layer_idx)
        layer.keys = torch.cat([keys[..., :s, :], recent_keys], dim=-2)
        layer.values = torch.cat([values[..., :s, :], values[..., length - w :, :]], dim=-2)


def chunked_prefill(model, input_ids: torch.Tensor, cache, chunk_size: int, logits_to_keep: int = 1):
    """Feed a long prompt through ``model`` in chunks of ``chunk_size`` tokens (call inside the press).

    With :class:`LazyStreamingPress` the cache is compacted whenever a chunk pushes it past
    ``cap_total``, so memory stays bounded however long the prompt. Returns the last chunk's output.
    """
    if chunk_size < 1:
        raise PressParameterError(f"chunked_prefill: chunk_size={chunk_size} must be >= 1.")
    out = None
    for start in range(0, input_ids.shape[1], chunk_size):
        out = model(input_ids=input_ids[:, start : start + chunk_size], past_key_values=cache,
                    logits_to_keep=logits_to_keep)
    return out
