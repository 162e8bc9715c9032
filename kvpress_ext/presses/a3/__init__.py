"""A3 / CacheBlend KV-cache fusion: chunk store, token selection, masked attention, fusion, press."""

from kvpress_ext.presses.a3.attention import masked_attention, reference_attention
from kvpress_ext.presses.a3.chunk_store import ChunkKV, ChunkStore
from kvpress_ext.presses.a3.fusion import FusionResult, fuse_chunks, realign
from kvpress_ext.presses.a3.press import STRATEGIES, A3Press

__all__ = [
    "STRATEGIES",
    "A3Press",
    "ChunkKV",
    "ChunkStore",
    "FusionResult",
    "fuse_chunks",
    "masked_attention",
    "realign",
    "reference_attention",
]
