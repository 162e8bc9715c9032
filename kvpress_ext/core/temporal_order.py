"""Keep a scorer press's kept entries in the order the tokens came, so that it can compress a cache again.

kvpress 0.5.5's ``ScorerPress.compress`` gathers the kept entries in ``topk`` order (by score, ties in any order),
not in the tokens' order (NVIDIA/kvpress issue #173, acknowledged as overlooked). One compression of a prefill does
not care: attention is the same in any order and RoPE is already in the keys. A second compression of the same
cache does, for every press whose score reads the cache index as a token's age: StreamingLLM prunes indices
``n_sink .. n_sink + n_pruned`` (after a shuffle those are neither the sinks nor the oldest tokens), and SnapKV
pools scores over neighbouring indices. Our incremental perplexity (``EveryChunkPress``) and kvpress's
``DecodingPress`` both compress the same cache again and again.

:class:`TemporalOrderPress` wraps a scorer press and compresses as ``ScorerPress.compress`` does (the inner press's
scores, the same number kept, ties broken as ``topk`` breaks them) but puts the kept entries back in cache order.
:func:`keep_token_order` applies it inside kvpress's wrappers that compress a cache a press already compressed
(``DecodingPress``, ``PrefillDecodingPress``, ``ComposedPress``); the registry does so for every press it builds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kvpress import ScorerPress
from kvpress.utils import compute_n_kept

from kvpress_ext.core.contract import PressContract, contract_of


@dataclass
class TemporalOrderPress(ScorerPress):
    """``press`` with its kept entries left in the order they had in the cache.

    Parameters
    ----------
    press : ScorerPress
        A scorer press whose ``compress`` is ``ScorerPress.compress`` (its ``score`` decides what is kept).
    compression_ratio : float
        Fraction removed, as for ``press`` (set on ``press`` while it scores, for scorers that read it).
    """

    press: ScorerPress = None
    compression_ratio: float = 0.0

    def __post_init__(self):
        if not isinstance(self.press, ScorerPress) or type(self.press).compress is not ScorerPress.compress:
            raise TypeError(f"TemporalOrderPress wraps a ScorerPress that keeps ScorerPress.compress; got "
                            f"{type(self.press).__name__}")
        super().__post_init__()

    def post_init_from_model(self, model):
        self.press.post_init_from_model(model)

    def press_contract(self) -> PressContract:
        """The inner scorer's contract: the same entries are kept, only their order differs."""
        return contract_of(self.press)

    def score(self, module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        saved = self.press.compression_ratio
        self.press.compression_ratio = self.compression_ratio  # StreamingLLM sizes its pruned span from it
        try:
            return self.press.score(module, hidden_states, keys, values, attentions, kwargs)
        finally:
            self.press.compression_ratio = saved

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        if self.compression_ratio == 0:
            return keys, values
        scores = self.score(module, hidden_states, keys, values, attentions, kwargs)
        n_kept = compute_n_kept(keys.shape[2], self.compression_ratio)
        indices = scores.topk(n_kept, dim=-1).indices.sort(dim=-1).values  # the same set, in cache order
        indices = indices.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
        return keys.gather(2, indices).contiguous(), values.gather(2, indices).contiguous()


def in_temporal_order(press):
    """``press`` wrapped in :class:`TemporalOrderPress` if it is a plain scorer press, else ``press`` itself."""
    if isinstance(press, ScorerPress) and not isinstance(press, TemporalOrderPress) \
            and type(press).compress is ScorerPress.compress:
        return TemporalOrderPress(press=press, compression_ratio=press.compression_ratio)
    return press


def keep_token_order(press):
    """Wrap, in place, the plain scorer presses inside kvpress's wrappers that compress an already compressed cache:
    ``DecodingPress.base_press`` (every ``compression_interval`` steps), ``PrefillDecodingPress``'s two presses (the
    decoding one compresses what the prefill one kept) and every press of a ``ComposedPress`` (each compresses the
    previous one's output). Returns ``press``. A single compression keeps the same entries either way."""
    from kvpress import ComposedPress, DecodingPress, PrefillDecodingPress

    if isinstance(press, DecodingPress):
        press.base_press = in_temporal_order(press.base_press)
    elif isinstance(press, PrefillDecodingPress):
        press.prefilling_press = keep_token_order(in_temporal_order(press.prefilling_press))
        press.decoding_press = keep_token_order(press.decoding_press)
    elif isinstance(press, ComposedPress):
        press.presses = [keep_token_order(in_temporal_order(p)) for p in press.presses]
    return press
