"""R-KV: redundancy-aware KV-cache compression for reasoning models, with optional key rotation.

Paper: Cai et al., "R-KV: Redundancy-aware KV Cache Compression for Reasoning Models" (arXiv 2505.24133);
reference code: Zefan-Cai/R-KV (``rkv/compression/r1_kv.py``). This is our own implementation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from kvpress import BasePress
from kvpress.utils import get_prerope_query_states

from kvpress_ext import rope
from kvpress_ext.errors import PressParameterError
from kvpress_ext.positions import position_state, set_next_position
from kvpress_ext.registry import register_press

RETAIN_DIRECTIONS = ("last", "first", "last_percent", "first_percent")
SIMILARITY_THRESHOLD = 0.5
_CACHE_ATTR = "_kvpress_ext_rkv"


def rkv_redundancy(keys: torch.Tensor, retain_direction: str = "last", retain_ratio: float = 0.1,
                   threshold: float = SIMILARITY_THRESHOLD) -> torch.Tensor:
    """Redundancy of each key, (..., L) -> softmax over L of the mean cosine similarity to the other keys.

    For each key (row) one similar key (cosine > ``threshold``) is spared: the last one (``"last"``), the
    first one (``"first"``), or the one at the ``retain_ratio`` quantile of the similar indices
    (``*_percent``); rows with no similar key are left as they are. One batched matmul, no token loop.
    """
    k = keys.float()
    k = k / (k.norm(dim=-1, keepdim=True) + 1e-8)
    sim = k @ k.transpose(-1, -2)
    n = sim.shape[-1]
    sim.diagonal(dim1=-2, dim2=-1).zero_()
    mask = sim > threshold
    valid = mask.any(dim=-1)
    if retain_direction == "first":
        chosen = mask.to(torch.uint8).argmax(dim=-1)  # first maximum = first similar index
    elif retain_direction == "last":
        chosen = n - 1 - mask.flip(-1).to(torch.uint8).argmax(dim=-1)
    else:
        # the rank-th similar index counted from the end ("last_percent") or the start ("first_percent")
        rank = max(1, int(n * retain_ratio))
        count = mask.sum(dim=-1)
        r = torch.clamp(count, max=rank)
        target = count - r + 1 if retain_direction == "last_percent" else r
        hit = mask & (mask.cumsum(dim=-1) == target.unsqueeze(-1))
        chosen = hit.to(torch.uint8).argmax(dim=-1)
    del mask
    # spare the chosen key of each row (in place: no second n x n tensor)
    chosen = chosen.unsqueeze(-1)
    sim.scatter_(-1, chosen, torch.where(valid.unsqueeze(-1), 0.0, sim.gather(-1, chosen)))
    return sim.mean(dim=-1).softmax(dim=-1)


def rkv_importance(queries: torch.Tensor, keys: torch.Tensor, num_candidates: int, kernel_size: int) -> torch.Tensor:
    """Attention of the window ``queries`` (B, Hq, w, d) over the first ``num_candidates`` ``keys`` (B, H, L, d).

    Logits are max-pooled over each KV head's query group, softmaxed over the candidate keys, averaged over
    the queries and max-pooled along the sequence with ``kernel_size``: (B, H, num_candidates).
    """
    b, hq, w, d = queries.shape
    h = keys.shape[1]
    q = queries.float().view(b, h, hq // h, w, d)
    logits = q @ keys[:, :, :num_candidates].float().unsqueeze(2).transpose(-1, -2) / d**0.5
    logits = logits.amax(dim=2)
    attn = logits.softmax(dim=-1).mean(dim=-2)
    return F.max_pool1d(attn, kernel_size=kernel_size, padding=kernel_size // 2, stride=1)


def rkv_scores(queries, keys, window_size: int, kernel_size: int = 7, mix_lambda: float = 0.07,
               retain_direction: str = "last", retain_ratio: float = 0.1) -> torch.Tensor:
    """R-KV score of every key before the recent window: (B, H, L - window_size).

    ``mix_lambda * importance - (1 - mix_lambda) * redundancy``; redundancy is computed over all L keys.
    """
    n_cand = keys.shape[-2] - window_size
    importance = rkv_importance(queries, keys, n_cand, kernel_size)
    redundancy = rkv_redundancy(keys, retain_direction, retain_ratio)[..., :n_cand]
    return mix_lambda * importance - (1 - mix_lambda) * redundancy


def rkv_select(queries, keys, budget: int, window_size: int, prefix: int = 0, **score_kwargs) -> torch.Tensor:
    """Sorted cache indices (B, H, budget) to keep: the prefix, the top-scored middle keys, the last window."""
    b, h, n, _ = keys.shape
    scores = rkv_scores(queries, keys, window_size, **score_kwargs)[..., prefix:]
    top = scores.topk(budget - window_size - prefix, dim=-1).indices + prefix
    fixed = torch.cat([torch.arange(prefix), torch.arange(n - window_size, n)]).to(keys.device)
    keep = torch.cat([top, fixed.expand(b, h, -1)], dim=-1)
    return keep.sort(dim=-1).values


@dataclass
class _LayerState:
    """Per-layer bookkeeping kept on the cache: original token index and current RoPE position of each slot,
    and the last ``window_size`` post-RoPE queries (with their positions)."""

    original: torch.Tensor  # (B, H, L) long: index of the token in the stream fed through the cache
    position: torch.Tensor  # (B, H, L) long: RoPE position the key currently has
    queries: torch.Tensor | None = None  # (B, Hq, <=w, d)
    query_positions: torch.Tensor | None = None  # (<=w,)


def rkv_slot_positions(cache, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(original token indices, current RoPE positions) of layer ``layer_idx``'s slots, each (B, H, L)."""
    state = getattr(getattr(cache, "_cache", cache), _CACHE_ATTR)[layer_idx]
    return state.original, state.position


@register_press("rkv")
@dataclass
class RKVPress(BasePress):
    """R-KV (Cai et al. 2025, arXiv 2505.24133): keep keys that are attended to and not redundant.

    When the cache of a layer exceeds ``budget`` each KV head keeps ``budget`` tokens: the first
    ``initial_non_compressible_length`` tokens, the last ``window_size`` tokens, and the top
    ``budget - window_size - initial_non_compressible_length`` others by
    ``mix_lambda * importance - (1 - mix_lambda) * redundancy``. Importance is the attention of the last
    ``window_size`` queries (max over each KV head's query group, softmax, mean over queries, max-pooled
    with ``kernel_size``); redundancy is the softmax of each key's mean cosine similarity to the other keys,
    sparing one similar key (> 0.5) per row chosen by ``retain_direction``.

    Parameters
    ----------
    budget: tokens kept per head after a compression (prefix and window included).
    window_size: recent tokens always kept; their queries score the others.
    kernel_size: max-pooling width that smooths importance along the sequence.
    mix_lambda: weight of importance against redundancy.
    retain_ratio: ``*_percent`` directions only: spare the ``max(1, int(L * retain_ratio))``-th similar key
        from the end ("last_percent") or the start ("first_percent"); our reading, upstream's differs.
    retain_direction: which similar key is spared per row: "last", "first", "last_percent", "first_percent".
    initial_non_compressible_length: leading tokens (e.g. a system prompt) never evicted, counted in the budget.
    compression_interval: the buffer. A forward of several tokens (prefill, a new document) compresses as
        soon as the cache exceeds ``budget``; single-token decoding compresses when the cache reaches
        ``budget + compression_interval``, i.e. every ``compression_interval`` generated tokens, so the cache
        stays <= budget + compression_interval.
    rotate_keys: after a compression, re-rotate kept keys (after the prefix) to contiguous positions
        starting at ``initial_non_compressible_length + rotation_offset``; the next token follows them.
        Without rotation keys keep their positions and the next token gets the number of tokens seen.
    rotation_offset: gap between the prefix and the first rotated key.
    """

    budget: int = 128
    window_size: int = 8
    kernel_size: int = 7
    mix_lambda: float = 0.07
    retain_ratio: float = 0.1
    retain_direction: str = "last"
    initial_non_compressible_length: int = 0
    compression_interval: int = 128
    rotate_keys: bool = False
    rotation_offset: int = 0
    compression_phases: tuple = field(default=(True, True), init=False, repr=False)
    uses_apply_press = True
    budget_parameters = ("budget",)  # given explicitly, it wins over a compression ratio

    @classmethod
    def from_compression_ratio(cls, compression_ratio: float, context_length: int, **params):
        """The press whose ``budget`` is ``(1 - compression_ratio) * context_length`` tokens (sweeps compare
        it with ratio-based presses at one memory budget)."""
        window = params.get("window_size", 8) + params.get("initial_non_compressible_length", 0)
        return cls(budget=max(window + 1, round((1 - compression_ratio) * context_length)), **params)

    def __post_init__(self):
        for name in ("budget", "window_size", "kernel_size", "compression_interval"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise PressParameterError(f"RKVPress.{name} must be a positive integer, got {v!r}.")
        p = self.initial_non_compressible_length
        if isinstance(p, bool) or not isinstance(p, int) or p < 0:
            raise PressParameterError(f"RKVPress.initial_non_compressible_length must be an integer >= 0, got {p!r}.")
        if self.budget <= self.window_size + p:
            raise PressParameterError(
                f"RKVPress.budget ({self.budget}) must exceed window_size + initial_non_compressible_length "
                f"({self.window_size} + {p})."
            )
        if not 0.0 <= float(self.mix_lambda) <= 1.0:
            raise PressParameterError(f"RKVPress.mix_lambda must be in [0, 1], got {self.mix_lambda!r}.")
        if not 0.0 < float(self.retain_ratio) <= 1.0:
            raise PressParameterError(f"RKVPress.retain_ratio must be in (0, 1], got {self.retain_ratio!r}.")
        if self.retain_direction not in RETAIN_DIRECTIONS:
            raise PressParameterError(
                f"RKVPress.retain_direction must be one of {RETAIN_DIRECTIONS}, got {self.retain_direction!r}."
            )
        if not isinstance(self.rotation_offset, int) or self.rotation_offset < 0:
            raise PressParameterError(f"RKVPress.rotation_offset must be an integer >= 0, got {self.rotation_offset!r}.")

    def __call__(self, model):
        from kvpress_ext.apply import apply_press

        return apply_press(self, model)

    # --- hook -------------------------------------------------------------------------------------
    def _layer_state(self, cache, layer_idx, length, n_new, device, bsz, heads) -> _LayerState:
        real = getattr(cache, "_cache", cache)  # GPT-NeoX hands us a basis view of the cache
        states = getattr(real, _CACHE_ATTR, None)
        if states is None:
            states = {}
            setattr(real, _CACHE_ATTR, states)
        pos = position_state(cache)
        # the first layer of a forward records where its tokens went (later layers may rotate and move it)
        if states.get("forward") != pos.seen_tokens:
            states["forward"], states["next_position"] = pos.seen_tokens, pos.next_position
        next_pos = states["next_position"]
        new_orig = torch.arange(pos.seen_tokens - n_new, pos.seen_tokens, device=device)
        new_pos = torch.arange(next_pos - n_new, next_pos, device=device)
        st = states.get(layer_idx)
        if st is None or st.original.shape[-1] != length - n_new:
            # A cache filled elsewhere (loaded, or before this press ran): assume contiguous slots.
            old = length - n_new
            st = _LayerState(
                original=torch.arange(pos.seen_tokens - length, pos.seen_tokens - n_new, device=device),
                position=torch.arange(next_pos - length, next_pos - n_new, device=device),
            )
            st.original = st.original.expand(bsz, heads, old).clone()
            st.position = st.position.expand(bsz, heads, old).clone()
            states[layer_idx] = st
        st.original = torch.cat([st.original, new_orig.expand(bsz, heads, -1)], dim=-1)
        st.position = torch.cat([st.position, new_pos.expand(bsz, heads, -1)], dim=-1)
        return st

    def forward_hook(self, module, input, kwargs, output):
        hidden = kwargs["hidden_states"]
        cache = kwargs["past_key_values"]
        if cache is None:
            return output
        layer_idx = module.layer_idx
        layer = cache.layers[layer_idx]
        keys, _values = layer.keys, layer.values
        bsz, heads, length, _ = keys.shape
        n_new = hidden.shape[1]
        st = self._layer_state(cache, layer_idx, length, n_new, keys.device, bsz, heads)

        # Buffer the last window_size post-RoPE queries (decoding hooks see one token at a time).
        w = self.window_size
        h_tail = hidden[:, -w:]
        q = get_prerope_query_states(module, h_tail)
        cos, sin = kwargs["position_embeddings"]
        cos, sin = cos[:, -w:].unsqueeze(1), sin[:, -w:].unsqueeze(1)
        q = (q * cos + rope.rotate_half(q) * sin).to(keys.dtype)
        q_pos = st.position[0, 0, -q.shape[-2]:]
        if st.queries is not None and n_new < w:
            q = torch.cat([st.queries, q], dim=-2)[..., -w:, :]
            q_pos = torch.cat([st.query_positions, q_pos])[-w:]
        st.queries, st.query_positions = q, q_pos

        if length <= self.budget or (n_new == 1 and length < self.budget + self.compression_interval):
            return output
        self._compress(module, cache, layer, st)
        return output

    def _compress(self, module, cache, layer, st: _LayerState):
        keys, values = layer.keys, layer.values
        prefix = self.initial_non_compressible_length
        # score with the buffered queries (fewer than window_size only right after a cache was loaded)
        keep = rkv_select(
            st.queries, keys, self.budget, self.window_size, prefix, kernel_size=self.kernel_size,
            mix_lambda=self.mix_lambda, retain_direction=self.retain_direction, retain_ratio=self.retain_ratio,
        )
        idx = keep.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
        keys, values = keys.gather(2, idx), values.gather(2, idx)
        st.original = st.original.gather(2, keep)
        old_pos = st.position.gather(2, keep)
        if self.rotate_keys:
            start = prefix + self.rotation_offset
            kept = keys.shape[-2]
            new_pos = torch.cat([
                old_pos[..., :prefix],
                torch.arange(start, start + kept - prefix, device=keys.device).expand(*keep.shape[:-1], -1),
            ], dim=-1)
            inv_freq = module.rotary_emb.inv_freq.to(keys.device)
            keys = rope.rerotate(keys, old_pos, new_pos, inv_freq)
            # the buffered queries belong to the last slots: move them with their keys
            nq = st.queries.shape[-2]
            st.queries = rope.rerotate(st.queries, st.query_positions, new_pos[0, 0, -nq:], inv_freq)
            st.query_positions = new_pos[0, 0, -nq:].clone()
            st.position = new_pos
            set_next_position(cache, start + kept - prefix)
        else:
            st.position = old_pos
        layer.keys, layer.values = keys, values
