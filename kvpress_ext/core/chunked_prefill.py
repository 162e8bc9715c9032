"""Chunked prefill with compression: a prefill-only press compresses after every chunk of a growing context.

Used by the incremental perplexity and by ``prefill_chunk_size`` (pipeline, ``generate``): the cache then never
holds more than the budget of the tokens seen so far plus one chunk.

kvpress's prefill presses compress only on the first forward into an empty cache: ``BasePress.forward_hook``
returns early unless ``is_prefilling(cache_position, q_len)`` (``cache_position[-1] + 1 == q_len``). To measure
perplexity under compression, the text is fed chunk by chunk and every chunk's logits must come from a cache the
press already compressed, so each chunk has to count as a prefill for the press.

:class:`EveryChunkPress` wraps any hook-based press and does that generically: the inner press's own
``forward_hook`` runs after every chunk, with ``cache_position`` shown relative to the chunk (so its prefill test
passes); positions used by the model are untouched (they come from the cache, :mod:`kvpress_ext.core.positions`).

Tokens seen so far are the cache's own count (:class:`~kvpress_ext.core.positions.PositionState`), so each
sequence of a padded batch is sized by its own length.

Ratio semantics: re-applying ``compression_ratio=r`` to an already compressed cache would shrink it
geometrically (the cache would settle near ``chunk * (1 - r) / r``). For presses with a settable
``compression_ratio`` the wrapper instead sets, per layer and chunk, the ratio that keeps
``round((1 - r) * tokens seen)`` entries, so the cache always holds a fraction ``1 - r`` of the text so far, as it
would after one prefill of the whole text. Presses without ``compression_ratio`` apply their own rule per chunk.

Order: kvpress's ``ScorerPress.compress`` leaves the kept entries in score order, which a second compression reads
as token order (StreamingLLM's sinks and recent window, SnapKV's pooling); plain scorer presses are therefore run
through :class:`kvpress_ext.core.temporal_order.TemporalOrderPress`, which keeps the same entries in cache order.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from kvpress import BasePress

from kvpress_ext.core.contract import (
    PressContract,
    compression_ratio_of,
    contract_of,
    has_settable_ratio,
    reset_press,
)
from kvpress_ext.core.errors import KVPressExtError
from kvpress_ext.core.positions import position_state
from kvpress_ext.core.temporal_order import in_temporal_order


class PrefillChunkError(KVPressExtError):
    """A ``prefill_chunk_size`` out of range, or given to a press that cannot be fed in chunks."""


@dataclass
class EveryChunkPress(BasePress):
    """Run ``press`` as a prefill compression after every forward (chunk) into the cache.

    Parameters
    ----------
    press : BasePress
        A hook-based prefill press (kvpress ScorerPress, AdaKV, ComposedPress, ...).
    keep_fraction_of_seen : bool
        If True and the press has a settable ``compression_ratio``, keep ``1 - compression_ratio`` of all tokens seen
        so far (see the module docstring); if False, apply the press's ratio to the current cache every chunk.
    """

    press: BasePress = None
    keep_fraction_of_seen: bool = True

    def __post_init__(self):
        self.press = in_temporal_order(self.press)  # compressed again every chunk: keep the cache in token order
        self._target_ratio = compression_ratio_of(self.press)
        self._cumulative = self.keep_fraction_of_seen and has_settable_ratio(self.press)

    @property
    def ratio_mode(self) -> str:
        return "keep (1-r) of seen tokens" if self._cumulative else "press rule applied per chunk"

    def post_init_from_model(self, model):
        self.press.post_init_from_model(model)

    def press_contract(self) -> PressContract:
        """The inner press's contract (batches included), compressing at every chunk of the prefill."""
        return replace(contract_of(self.press), prefill=True, decoding=False, runs_model=False)

    def reset(self):
        if self._cumulative:
            self.press.compression_ratio = self._target_ratio
        reset_press(self.press)

    def forward_hook(self, module, input, kwargs, output):
        hidden_states = kwargs["hidden_states"]
        q_len = hidden_states.shape[1]
        layer = getattr(module, "layer_idx", 0)
        cache = kwargs["past_key_values"]
        inner_kwargs = dict(kwargs)
        # Shown to the press as if this chunk were the first forward, so its prefill test passes.
        inner_kwargs["cache_position"] = torch.arange(q_len, device=hidden_states.device)
        if not self._cumulative:
            return self.press.forward_hook(module, input, inner_kwargs, output)
        k_len = int(cache.get_seq_length(layer))
        target = round((1 - self._target_ratio) * position_state(cache).seen_tokens)
        if target >= k_len or self._target_ratio == 0:
            return output
        # +0.5 so that kvpress's int(k_len * (1 - ratio)) gives exactly ``target``.
        self.press.compression_ratio = max(0.0, 1 - (target + 0.5) / k_len)
        try:
            return self.press.forward_hook(module, input, inner_kwargs, output)
        finally:
            self.press.compression_ratio = self._target_ratio


def check_prefill_chunk_size(chunk, context_length: int) -> None:
    """``prefill_chunk_size`` must be a whole number of tokens from 1 to the (longest) context's length."""
    if chunk is None:
        return
    if isinstance(chunk, bool) or not isinstance(chunk, int) or not 1 <= chunk <= context_length:
        raise PrefillChunkError(f"prefill_chunk_size={chunk!r} is invalid: give an integer from 1 to the context's "
                                f"length ({context_length} tokens), or leave it out to prefill in one pass.")


def press_for_chunks(press, chunk):
    """The press to feed a context through in chunks of ``chunk`` tokens: a prefill-only hook press is wrapped so it
    compresses after every chunk (token order kept); a press that already compresses as tokens arrive (R-KV, lazy
    streaming, decoding presses) runs as it is. A press that runs the model itself cannot be fed in chunks."""
    if chunk is None or press is None:
        return press
    contract = contract_of(press)
    if contract.runs_model:
        raise PrefillChunkError(f"{type(press).__name__} runs the model itself on the whole context: leave "
                                "prefill_chunk_size out for it.")
    if contract.prefill and not (contract.decoding or contract.whole_cache or contract.chunked_prefill):
        return EveryChunkPress(press=press)
    return press
