"""A3Press: answer from separately precomputed chunk caches, fused by selective recompute.

CacheBlend (Yao et al., "CacheBlend: Fast Large Language Model Serving for RAG with Cached Knowledge
Fusion", EuroSys 2025) and A3 (arXiv 2511.17560): retrieved chunks are prefilled once, on their own,
and stored. At question time their caches are concatenated, their keys re-rotated to the new
positions, and only a small fraction of document tokens (plus the question) is recomputed, restoring
most of the cross-chunk attention that separate encoding missed, at a fraction of a full prefill.

Usage::

    from kvpress_ext.presses.a3 import A3Press, ChunkStore

    store = ChunkStore("cache/a3", model, tokenizer)            # prefix defaults to [BOS]
    store.precompute(passages)                                   # once, offline (reused afterwards)
    press = A3Press(strategy="debug", rate=0.15, store=store)
    cache, logits = press.fuse(model, passages[:4], question_ids)    # cache holds prefix+chunks+question
    # logits[-1] predicts the first answer token; continue decoding with `cache`
    # (e.g. kvpress_ext.runtime.pipeline.greedy_decode inside kvpress_ext.core.apply.apply_press(None, model)).

    # or through the pipeline, which makes the prompts and decodes (kvpress_ext.runtime.pipeline.answer_from_chunks):
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    pipe(context_chunks=passages[:4], question="Who ...?", press=press)["answer"]

Long-context evaluations (LongBench, Needle, RULER) call :meth:`A3Press.fuse` or
:meth:`A3Press.fuse_result` (which also returns the selected tokens and timings) per sample.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from kvpress_ext.core.contract import PressContract
from kvpress_ext.core.errors import PressParameterError
from kvpress_ext.core.registry import press_info, register_press
from kvpress_ext.presses.a3.chunk_store import ChunkStore
from kvpress_ext.presses.a3.evict import evict_cache
from kvpress_ext.presses.a3.fusion import FusionResult, fuse_chunks

STRATEGIES = ("blend", "debug", "attnlink", "full", "cat", "surprisal_chunk", "random")
ATTENTION_STRATEGIES = ("blend", "debug", "attnlink")


@register_press("a3")
@dataclass
class A3Press:
    """A3 / CacheBlend KV-cache fusion of separately precomputed chunks (arXiv 2511.17560; CacheBlend, EuroSys'25).

    Parameters
    ----------
    strategy: which document tokens to recompute after the selection layer:
        ``blend`` (CacheBlend: largest value deviation between fresh and stored V at the selection layer),
        ``debug`` (A3: attention of the question's queries to document keys, summed over heads and question
        tokens, average-pooled over ``pool_width`` tokens), ``attnlink`` (the same with the queries of the
        caller's ``sink_positions``, which are always kept), ``full`` (no document token: question only,
        i.e. plain concatenation of re-aligned caches), ``cat`` (only the last document token),
        ``surprisal_chunk`` (budget split over chunks by length, largest remainder; highest stored
        surprisal within each chunk), ``random``.
    rate: fraction of document tokens recomputed, in [0, 1]; the count ``int(rate * n_doc)`` is clamped to
        [1, n_doc]. Ignored by ``full`` and ``cat``.
    selection_layer: layer where tokens are picked; layers below it are recomputed in full. Default (None):
        1 for blend/debug/attnlink, 0 otherwise (as in A3's reference).
    pool_width: average-pooling width for the attention strategies (positive int).
    sink_positions: global token indices (prefix + document + question layout) whose queries score the
        document for ``attnlink``; required by it.
    store: the :class:`ChunkStore` holding (or receiving) the chunk caches; required for ``fuse``.
    evict: optional registry press name applied to the fused cache (e.g. ``"streaming_llm"``, ``"snapkv"``,
        ``"knorm"``); ``evict_kwargs`` are its parameters.
    seed: seed of the ``random`` strategy.
    attention_backend: ``auto`` (flashinfer on CUDA when installed, else PyTorch), ``torch`` or ``flashinfer``.
    """

    strategy: str = "blend"
    rate: float = 0.15
    selection_layer: int | None = None
    pool_width: int = 5
    sink_positions: list[int] | None = None
    store: ChunkStore | None = None
    evict: str | None = None
    evict_kwargs: dict = field(default_factory=dict)
    seed: int = 0
    attention_backend: str = "auto"

    #: A3 does not hook a normal prefill; it builds the cache itself from pre-chunked contexts (see :meth:`fuse`).
    contract: ClassVar[PressContract] = PressContract(prefill=False, takes_context_chunks=True)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise PressParameterError(f"a3: strategy={self.strategy!r} is unknown; choose from {', '.join(STRATEGIES)}.")
        if isinstance(self.rate, bool) or not isinstance(self.rate, (int, float)) or not 0 <= self.rate <= 1:
            raise PressParameterError(f"a3: rate={self.rate!r} must be a number in [0, 1] (fraction recomputed).")
        if self.selection_layer is None:
            self.selection_layer = 1 if self.strategy in ATTENTION_STRATEGIES else 0
        if isinstance(self.selection_layer, bool) or not isinstance(self.selection_layer, int) or self.selection_layer < 0:
            raise PressParameterError(f"a3: selection_layer={self.selection_layer!r} must be an int >= 0.")
        if isinstance(self.pool_width, bool) or not isinstance(self.pool_width, int) or self.pool_width < 1:
            raise PressParameterError(f"a3: pool_width={self.pool_width!r} must be a positive integer.")
        if self.strategy == "attnlink" and not self.sink_positions:
            raise PressParameterError("a3: strategy='attnlink' needs sink_positions (global token indices), got none.")
        if self.attention_backend not in ("auto", "torch", "flashinfer"):
            raise PressParameterError("a3: attention_backend must be 'auto', 'torch' or 'flashinfer'.")
        if self.evict is not None:
            press_info(self.evict)  # unknown names fail now, with suggestions

    # --- main API ---------------------------------------------------------------------------------------------
    def fuse(self, model, chunks, question_ids, prefix_ids=None):
        """Fuse ``chunks`` (token-id lists or strings) with ``question_ids``: returns ``(cache, logits)``.

        ``cache`` is a DynamicCache of prefix + chunks + question (its position state says where the next
        token goes); ``logits`` (n_question, vocab) are the next-token logits at each question token.
        """
        result = self.fuse_result(model, chunks, question_ids, prefix_ids)
        return result.cache, result.logits

    def fuse_result(self, model, chunks, question_ids, prefix_ids=None) -> FusionResult:
        """Like :meth:`fuse`, with the selected tokens and timings: ``load_s`` (open and map the stored
        entries), ``fuse_s`` (all of fusion, of which ``realign_s`` reads the mapped tensors and rotates
        the keys) and ``evict_s``."""
        if self.store is None:
            raise PressParameterError("a3: A3Press.fuse needs store=ChunkStore(...).")
        if not chunks:
            raise ValueError("a3: fuse needs at least one chunk.")
        store = self.store
        if isinstance(question_ids, str):
            question_ids = store.encode(question_ids)
        question_ids = [int(t) for t in (question_ids.tolist() if torch.is_tensor(question_ids) else question_ids)]
        t0 = time.perf_counter()
        prefix = store._prefix(prefix_ids)
        prefix_kv = store.prefix(prefix) if prefix else None
        need_s = self.strategy == "surprisal_chunk"
        chunk_kv = [store.get(c, prefix, need_surprisal=need_s) for c in chunks]
        t1 = time.perf_counter()
        result = fuse_chunks(
            model, prefix_kv, chunk_kv, question_ids, strategy=self.strategy, rate=float(self.rate),
            selection_layer=self.selection_layer, pool_width=self.pool_width, sink_positions=self.sink_positions,
            seed=self.seed, attention_backend=self.attention_backend, record_inputs=self.evict is not None,
        )
        t2 = time.perf_counter()
        if self.evict is not None:
            evict_cache(model, result, self.evict, self.evict_kwargs)
        t3 = time.perf_counter()
        result.timings = {"load_s": t1 - t0, "fuse_s": t2 - t1, "evict_s": t3 - t2, **result.timings}
        return result
