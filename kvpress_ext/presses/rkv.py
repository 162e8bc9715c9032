"""R-KV: redundancy-aware KV-cache compression for reasoning models, with optional key rotation.

Paper: Cai et al., "R-KV: Redundancy-aware KV Cache Compression for Reasoning Models" (arXiv 2505.24133);
reference code: Zefan-Cai/R-KV (``rkv/utils.py``: ``cal_similarity``; ``rkv/compression/r1_kv.py``:
``R1KV.update_kv``; ``rkv/modeling.py``: when to compress). This is our own implementation of the same
scoring; tests/test_rkv_scoring.py checks it against per-element loops written from the algorithm's description.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from kvpress import BasePress
from kvpress.utils import get_prerope_query_states

from kvpress_ext.core import rope
from kvpress_ext.core.apply import apply_press
from kvpress_ext.core.contract import PressContract
from kvpress_ext.core.errors import PressParameterError
from kvpress_ext.core.positions import position_state, set_next_position
from kvpress_ext.core.registry import register_press

RETAIN_DIRECTIONS = ("last", "first", "last_percent", "first_percent")
SCHEDULES = ("interval", "published")
SIMILARITY_THRESHOLD = 0.5
_CACHE_ATTR = "_kvpress_ext_rkv"


def retained_index(mask: torch.Tensor, retain_direction: str = "last", retain_ratio: float = 0.1) -> torch.Tensor:
    """Per row of the similarity ``mask`` (..., L, L), the column r_i whose similarity is not counted.

    As published, an index tensor holds column j where key j is similar to key i and 0 elsewhere (the
    diagonal included), so a row with no similar key retains column 0:

    - ``"last"``: the last similar column (the maximum of the index tensor);
    - ``"first"``: the first similar column, 0 when there is none. Not literally the published code: it
      takes the minimum of the index tensor, which is 0 in every row (the diagonal entry is never
      similar), so it always spares column 0; we follow its stated intent (the first similar index);
    - ``"last_percent"``: the largest of the top ``k`` of the index tensor, i.e. the same column as
      ``"last"`` (as published);
    - ``"first_percent"``: the ``k``-th smallest entry of the index tensor (zeros included, as published),
      ``k = max(1, int(L * retain_ratio))``; it is 0 unless fewer than ``k`` entries of the row are 0.
    """
    n = mask.shape[-1]
    if retain_direction == "first":
        return mask.view(torch.uint8).argmax(dim=-1)  # first maximum = first similar column, 0 if none
    if retain_direction in ("last", "last_percent"):
        last = n - 1 - mask.flip(-1).view(torch.uint8).argmax(dim=-1)  # n - 1 when the row has none
        found = mask.gather(-1, last.unsqueeze(-1)).squeeze(-1)
        return torch.where(found, last, torch.zeros_like(last))
    if retain_direction != "first_percent":
        raise PressParameterError(f"retain_direction must be one of {RETAIN_DIRECTIONS}, got {retain_direction!r}.")
    k = max(1, int(n * retain_ratio))
    positive = mask.clone()
    positive[..., 0] = False  # column 0 encodes as 0 whether similar or not
    zeros = n - positive.sum(dim=-1)
    # sorted row: `zeros` zeros, then the similar columns > 0 in order; the k-th is the (k - zeros)-th of those
    target = (k - zeros).unsqueeze(-1)
    hit = positive & (positive.cumsum(dim=-1) == target)
    return hit.view(torch.uint8).argmax(dim=-1)  # no hit (k <= zeros) -> 0


def rkv_redundancy(keys: torch.Tensor, retain_direction: str = "last", retain_ratio: float = 0.1,
                   threshold: float = SIMILARITY_THRESHOLD) -> torch.Tensor:
    """Redundancy of each key, (..., L, d) -> (..., L), as in R-KV's published code.

    S is the cosine similarity of the keys with a zero diagonal. In each row i one entry S[i, r_i] is
    zeroed, r_i from :func:`retained_index` (the similar key that row spares); the redundancy of key j is
    the mean over the rows i of S[i, j] (a column mean), softmaxed over the keys. Computed per batch
    element and head (the published code uses the first batch element's keys for the whole batch).

    For "last", "last_percent" and "first" only r_i is needed from S's rows, so S is never built whole
    (:func:`_redundancy_by_blocks`); "first_percent" counts similar columns and builds it.
    """
    k = keys.float()
    k = k / (k.norm(dim=-1, keepdim=True) + 1e-8)
    if retain_direction in ("last", "last_percent", "first"):
        return _redundancy_by_blocks(k, retain_direction == "first", threshold)
    sim = k @ k.transpose(-1, -2)
    sim.diagonal(dim1=-2, dim2=-1).zero_()
    retained = retained_index(sim > threshold, retain_direction, retain_ratio)
    sim.scatter_(-1, retained.unsqueeze(-1), 0.0)  # in place: no second L x L float tensor
    return sim.mean(dim=-2).softmax(dim=-1)


def _redundancy_by_blocks(k: torch.Tensor, first: bool, threshold: float, block: int = 32) -> torch.Tensor:
    """:func:`rkv_redundancy` of unit keys ``k`` for the last (or ``first``) similar column, without S whole.

    The column sums of S are ``(sum_i k_i) . k_j`` (a matrix-vector product) less the diagonal and the one
    entry S[i, r_i] each row spares. r_i is looked for from the end (the start for ``first``) in blocks of
    columns of doubling width, ``block`` first, each for the rows that have found none yet: real keys are
    similar to many others (SmolLM2 at R-KV's default 512 + 128 tokens: 83-98 % of the rows find theirs in the
    last 128 columns), so this takes a fraction of the L x L similarity products and none of its temporaries.
    """
    *lead, n, d = k.shape
    kf = k.reshape(-1, n, d)  # (N, L, d): one row of keys per batch element and head
    retained = torch.full(kf.shape[:-1], -1, dtype=torch.long, device=k.device)  # -1: none found yet
    rows = torch.arange(n, device=k.device).expand(kf.shape[0], -1)  # per head, the rows still looking (padded)
    queries, done, width = kf, 0, block
    while done < n:
        width = min(width, n - done)
        start = done if first else n - done - width
        hit = _similar_column(kf, queries, rows, start, first, threshold, width)
        before = retained.gather(1, rows)
        retained.scatter_(1, rows, torch.where(before < 0, hit, before))  # a nearer block's column wins
        done, width = done + width, 2 * width
        missing = retained.gather(1, rows) < 0
        m = int(missing.sum(dim=-1).max())
        if m == 0:
            break
        if m < rows.shape[1]:  # keep the rows still looking, padded to m per head with rows that are done
            rows = rows.gather(1, missing.to(torch.uint8).sort(dim=-1, descending=True, stable=True).indices[:, :m])
            queries = _take_rows(kf, rows)
    retained = retained.clamp_min(0)  # a row similar to no key spares column 0 (as published)
    spared = (kf * _take_rows(kf, retained)).sum(dim=-1).reshape(*lead, n)  # S[i, r_i]
    retained = retained.reshape(*lead, n)
    col_sums = (k.sum(dim=-2, keepdim=True) @ k.transpose(-1, -2)).squeeze(-2)  # sum_i S[i, j], diagonal included
    col_sums = col_sums - (k * k).sum(dim=-1)
    spared = spared.masked_fill(retained == torch.arange(n, device=k.device), 0.0)  # row 0 spares its own 0
    col_sums = col_sums.scatter_add(-1, retained, -spared)
    return (col_sums / n).softmax(dim=-1)


def _similar_column(kf, rows, row_index, start: int, first: bool, threshold: float, width: int):
    """For each of ``rows`` (N, m, d) (key ``row_index`` (N, m) of its head), the first (or last) column in
    ``kf[:, start:start + width]`` other than its own with similarity > ``threshold``; -1 where none."""
    similar = rows @ kf[:, start : start + width].transpose(-1, -2) > threshold  # (N, m, width)
    own = (row_index - start).clamp(0, width - 1).unsqueeze(-1)  # S[i, i] = 0: clear each row's own column
    outside = ((row_index < start) | (row_index >= start + width)).unsqueeze(-1)
    similar.scatter_(-1, own, similar.gather(-1, own) & outside)
    # the first / last similar column as the largest of a weight that falls / grows along the block (0: none);
    # float multiplication and max are faster than argmax or where on CPU, and exact below 2**24 columns
    index = torch.arange(width, 0, -1, device=kf.device) if first else torch.arange(1, width + 1, device=kf.device)
    best = (similar * index.to(kf.dtype)).amax(dim=-1).long()
    hit = start + width - best if first else start + best - 1
    return hit.masked_fill(best == 0, -1)


def _keep_slots(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``x`` (B, H, L, d) at the slots ``keep`` (B, H, k): (B, H, k, d), as ``gather`` but by one index_select."""
    b, h, n, d = x.shape
    return _take_rows(x.reshape(b * h, n, d), keep.reshape(b * h, -1)).view(b, h, -1, d)


def _take_rows(kf: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``kf`` (N, L, d) at ``rows`` (N, m): (N, m, d), by one index_select (gather with an expanded index is
    several times slower on CPU)."""
    n_heads, n, d = kf.shape
    offset = torch.arange(n_heads, device=kf.device).unsqueeze(-1) * n
    return kf.reshape(-1, d).index_select(0, (rows + offset).reshape(-1)).view(n_heads, -1, d)


def rkv_importance(queries: torch.Tensor, keys: torch.Tensor, num_candidates: int, kernel_size: int) -> torch.Tensor:
    """Attention of the window ``queries`` (B, Hq, w, d) over the first ``num_candidates`` ``keys`` (B, H, L, d).

    Logits are max-pooled over each KV head's query group, softmaxed over the candidate keys, averaged over
    the queries and max-pooled along the sequence with ``kernel_size``: (B, H, num_candidates).
    """
    b, hq, w, d = queries.shape
    h = keys.shape[1]
    q = queries.float().reshape(b, h, hq // h * w, d)  # a head's query group as rows: no broadcast copy of keys
    logits = (q @ keys[:, :, :num_candidates].float().transpose(-1, -2)).view(b, h, hq // h, w, -1) / d**0.5
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
    dev = keys.device  # not torch's default device: it may differ from the model's
    fixed = torch.cat([torch.arange(prefix, device=dev), torch.arange(n - window_size, n, device=dev)])
    keep = torch.cat([top, fixed.expand(b, h, -1)], dim=-1)
    return keep.sort(dim=-1).values


@dataclass
class _LayerState:
    """Per-layer bookkeeping kept on the cache: original token index and current RoPE position of each slot,
    and what the last ``window_size`` queries are made of (attention inputs, the RoPE cos/sin they got and
    the positions those were for).

    Decoding adds one token per forward to every layer: that costs list appends here, and the tensors are
    built only when compressing (once per ``compression_interval`` tokens) or when asked for.
    """

    original: torch.Tensor  # (B, H, L0) long: index of the token in the stream fed through the cache
    position: torch.Tensor  # (B, H, L0) long: RoPE position the key currently has
    pending: list = field(default_factory=list)  # slots appended since: (first index, first position, count)
    inputs: list = field(default_factory=list)  # per forward, oldest first: (hidden, cos, sin), <= w tokens each
    query_positions: list = field(default_factory=list)  # RoPE position of each of the last <= w tokens

    @property
    def length(self) -> int:
        return self.original.shape[-1] + sum(n for _, _, n in self.pending)

    def materialize(self) -> None:
        """Append the pending slots to ``original`` and ``position``."""
        if not self.pending:
            return
        b, h, _ = self.original.shape
        dev = self.original.device
        orig = torch.cat([torch.arange(i, i + n, device=dev) for i, _, n in self.pending])
        pos = torch.cat([torch.arange(p, p + n, device=dev) for _, p, n in self.pending])
        self.original = torch.cat([self.original, orig.expand(b, h, -1)], dim=-1)
        self.position = torch.cat([self.position, pos.expand(b, h, -1)], dim=-1)
        self.pending = []

    def add_inputs(self, hidden, cos, sin, window: int) -> None:
        """Buffer a forward's attention inputs, dropping those older than the last ``window`` tokens."""
        if hidden.shape[1] > window:
            hidden, cos, sin = hidden[:, -window:], cos[:, -window:], sin[:, -window:]
        self.inputs.append((hidden, cos, sin))
        total = 0
        for i in range(len(self.inputs) - 1, -1, -1):
            total += self.inputs[i][0].shape[1]
            if total >= window:
                del self.inputs[:i]
                break

    def window_inputs(self, window: int):
        """(hidden, cos, sin) of the last <= ``window`` tokens."""
        return [torch.cat([x[k] for x in self.inputs], dim=1)[:, -window:] for k in range(3)]


def rkv_slot_positions(cache, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(original token indices, current RoPE positions) of layer ``layer_idx``'s slots, each (B, H, L)."""
    state = getattr(getattr(cache, "_cache", cache), _CACHE_ATTR)[layer_idx]
    state.materialize()
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
    with ``kernel_size``); redundancy is the softmax over keys of each key's mean cosine similarity to the
    other keys (a column mean of the similarity matrix), where each key (row) spares one similar key
    (> 0.5) chosen by ``retain_direction`` (see :func:`rkv_redundancy`).

    When to compress (``schedule``):

    - ``"interval"`` (default): a forward of several tokens (prefill, a new document) compresses as soon
      as the cache exceeds ``budget``; single-token decoding compresses when the cache reaches
      ``budget + compression_interval``, i.e. every ``compression_interval`` generated tokens once the
      budget is full. The cache stays <= ``budget + compression_interval`` and every document fed in one
      forward is compressed at once, wherever the stream's length happens to be. It is the default
      because the ICL workflow and the streaming-style callers feed documents of any length and rely on
      that; it also keeps earlier results reproducible.
    - ``"published"``: as the reference code (``divide_method="step_length"``): a forward compresses
      when the number of tokens fed through the cache *before* it is a multiple of
      ``compression_interval`` (the published ``divide_length``, default 128; 0 counts, so the prefill
      does) and the cache then holds more than ``budget`` tokens (the published test is ``>= budget``;
      at exactly ``budget`` it keeps every token, so we skip it). Same bound, but the phase is tied to
      the absolute length, and a multi-token forward starting off a multiple is not compressed. The
      published count is never reset between prompts; ours restarts with each cache.

    Parameters
    ----------
    budget: tokens kept per head after a compression (prefix and window included).
    window_size: recent tokens always kept; their queries score the others.
    kernel_size: max-pooling width that smooths importance along the sequence.
    mix_lambda: weight of importance against redundancy.
    retain_ratio: ``"first_percent"`` only (as published; ``"last_percent"`` ignores it, see
        :func:`retained_index`).
    retain_direction: which similar key is spared per row: "last" (published default), "first",
        "last_percent", "first_percent".
    initial_non_compressible_length: leading tokens (e.g. a system prompt) never evicted, counted in the budget.
    compression_interval: the buffer (``"interval"``) or the published ``divide_length`` (``"published"``).
    schedule: ``"interval"`` or ``"published"`` (above).
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
    schedule: str = "interval"
    rotate_keys: bool = False
    rotation_offset: int = 0
    #: Compresses at prefill and while decoding; ``budget`` given explicitly wins over a compression ratio.
    contract: ClassVar[PressContract] = PressContract(prefill=True, decoding=True, budget_parameters=("budget",),
                                                      batches=True)

    @classmethod
    def from_compression_ratio(cls, compression_ratio: float, context_length: int, **params):
        """The press at the KV budget of a ratio press: ``budget = round((1 - compression_ratio) *
        context_length)`` tokens (at least ``window_size + initial_non_compressible_length + 1``); sweeps compare
        it with ratio-based presses at one memory budget."""
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
        if self.schedule not in SCHEDULES:
            raise PressParameterError(f"RKVPress.schedule must be one of {SCHEDULES}, got {self.schedule!r}.")
        if not isinstance(self.rotation_offset, int) or self.rotation_offset < 0:
            raise PressParameterError(f"RKVPress.rotation_offset must be an integer >= 0, got {self.rotation_offset!r}.")

    def __call__(self, model):
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
        st = states.get(layer_idx)
        if st is None or st.length != length - n_new:
            # A cache filled elsewhere (loaded, or before this press ran): assume contiguous slots.
            old = length - n_new
            st = _LayerState(
                original=torch.arange(pos.seen_tokens - length, pos.seen_tokens - n_new, device=device),
                position=torch.arange(next_pos - length, next_pos - n_new, device=device),
            )
            st.original = st.original.expand(bsz, heads, old).clone()
            st.position = st.position.expand(bsz, heads, old).clone()
            states[layer_idx] = st
        st.pending.append((pos.seen_tokens - n_new, next_pos - n_new, n_new))
        st.query_positions = (st.query_positions + list(range(next_pos - n_new, next_pos)))[-self.window_size:]
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

        # Buffer what the last window_size queries are made of (decoding hooks see one token at a time).
        st.add_inputs(hidden, *kwargs["position_embeddings"], self.window_size)

        if self.should_compress(length, n_new, position_state(cache).seen_tokens):
            self._compress(module, cache, layer, st)
        return output

    def should_compress(self, length: int, n_new: int, seen_tokens: int) -> bool:
        """Whether a forward of ``n_new`` tokens that left ``length`` in the cache (``seen_tokens`` fed in
        all) compresses, under ``schedule``."""
        if length <= self.budget:
            return False
        if self.schedule == "published":
            return (seen_tokens - n_new) % self.compression_interval == 0
        return n_new > 1 or length >= self.budget + self.compression_interval

    def _queries(self, module, st: _LayerState, keys: torch.Tensor) -> torch.Tensor:
        """The buffered tokens' post-RoPE queries (B, Hq, <=w, d), at the positions their keys have now."""
        hidden, cos, sin = st.window_inputs(self.window_size)
        q = get_prerope_query_states(module, hidden)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = (q * cos + rope.rotate_half(q) * sin).to(keys.dtype)
        nq = q.shape[-2]
        now = st.position[0, 0, -nq:]
        then = torch.tensor(st.query_positions[-nq:], device=now.device)
        if self.rotate_keys and not torch.equal(now, then):  # an earlier compression moved these keys
            q = rope.rerotate(q, then, now, module.rotary_emb.inv_freq.to(keys.device))
        return q

    def _compress(self, module, cache, layer, st: _LayerState):
        st.materialize()
        keys, values = layer.keys, layer.values
        prefix = self.initial_non_compressible_length
        # score with the buffered queries (fewer than window_size only right after a cache was loaded)
        keep = rkv_select(
            self._queries(module, st, keys), keys, self.budget, self.window_size, prefix, kernel_size=self.kernel_size,
            mix_lambda=self.mix_lambda, retain_direction=self.retain_direction, retain_ratio=self.retain_ratio,
        )
        keys, values = _keep_slots(keys, keep), _keep_slots(values, keep)
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
            st.position = new_pos  # the buffered queries follow their keys when next computed (_queries)
            set_next_position(cache, start + kept - prefix)
        else:
            st.position = old_pos
        layer.keys, layer.values = keys, values
