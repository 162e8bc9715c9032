"""kvpress's own presses in the registry, under snake_case names (``knorm``, ``snapkv``, ``tova``, ...).

The list is read from ``kvpress.__all__`` at import, so a newer kvpress adds its presses without a code
change here; ``_NAMES`` only fixes names that an automatic conversion would spell badly, ``_DEFAULTS``
gives wrappers an inner press so every entry can be built with no arguments, and ``_REQUIRES`` says
which presses need something that cannot exist offline (a hub download, a specially trained model).
"""

from __future__ import annotations

import inspect
import re

import kvpress

_ABSTRACT = {"BasePress", "ScorerPress"}

_NAMES = {
    "SnapKVPress": "snapkv", "AdaKVPress": "adakv", "CriticalAdaKVPress": "critical_adakv",
    "CriticalKVPress": "criticalkv", "SimLayerKVPress": "simlayerkv", "ThinKPress": "think",
    "TOVAPress": "tova", "QFilterPress": "qfilter", "PyramidKVPress": "pyramidkv", "LagKVPress": "lagkv",
    "ChunkKVPress": "chunkkv", "KeyDiffPress": "keydiff", "KVgradPress": "kvgrad", "KVzipPress": "kvzip",
    "KVzapPress": "kvzap", "FastKVzipPress": "fastkvzip", "KVComposePress": "kvcompose",
    "RestoreKVPress": "restorekv", "EntropyGatedChunkKVPress": "entropy_gated_chunkkv", "LUKVPress": "lukv",
    "CURPress": "cur", "CAMPress": "cam", "DMSPress": "dms", "NonCausalAttnPress": "non_causal_attention",
    "StreamingLLMPress": "streaming_llm", "LeverageScorePress": "leverage_score",
}

#: Decoding presses size the cache themselves (target_size, target_compression_ratio) and override their scorer's
#: ratio; the scorer is built with 0.0 so that kvpress does not warn that a ratio it ignores is set.
_SCORER_OF_DECODING = {"base_press": "knorm", "compression_ratio": 0.0}

_DEFAULTS = {
    "AdaKVPress": {"press": "knorm"}, "ComposedPress": {"presses": ["knorm", "streaming_llm"]},
    "KeyRerotationPress": {"press": "knorm"}, "ChunkPress": {"press": "knorm"},
    "ChunkKVPress": {"press": "knorm"}, "BlockPress": {"press": "knorm"}, "CAMPress": dict(_SCORER_OF_DECODING),
    "DecodingPress": dict(_SCORER_OF_DECODING), "CompressionRatioDecodingPress": dict(_SCORER_OF_DECODING),
    "EntropyGatedChunkKVPress": {"press": "knorm"},
    "PerLayerCompressionPress": {"press": "knorm"}, "CriticalKVPress": {"press": "knorm"},
    "CriticalAdaKVPress": {"press": "knorm"}, "MergingPress": {"press": "knorm"},
    "DMSPress": {"press": "random", "threshold": 0.5, "sliding_window_size": 8},
}

_HUB = "weights or statistics downloaded from the Hugging Face hub for a supported checkpoint"
_REQUIRES: dict[str, str] = {
    "DuoAttentionPress": "attention patterns of a supported checkpoint (" + _HUB + ")",
    "QFilterPress": _HUB, "ExpectedAttentionStatsPress": _HUB, "KVzapPress": _HUB, "FastKVzipPress": _HUB,
    "RestoreKVPress": _HUB, "KVzipPress": "a hub checkpoint name (it re-runs the model on a reconstruction prompt)",
    "KVgradPress": "a hub checkpoint name", "LUKVPress": "a budget curve for a supported checkpoint",
    "FinchPress": "a delimiter token: call press.update_model_and_tokenizer(model, tokenizer) first",
}


def snake_name(class_name: str) -> str:
    """``ExpectedAttentionPress`` -> ``expected_attention``, unless ``_NAMES`` says otherwise."""
    if class_name in _NAMES:
        return _NAMES[class_name]
    name = class_name.removesuffix("Press")
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()


def kvpress_press_classes() -> dict[str, type]:
    """Every concrete press class kvpress exports, by registry name."""
    out = {}
    for attr in getattr(kvpress, "__all__", dir(kvpress)):
        cls = getattr(kvpress, attr, None)
        if inspect.isclass(cls) and issubclass(cls, kvpress.BasePress) and attr not in _ABSTRACT:
            out[snake_name(attr)] = cls
    return out


def register_kvpress_presses(register) -> None:
    for name, cls in kvpress_press_classes().items():
        register(name, cls, defaults=_DEFAULTS.get(cls.__name__), requires=_REQUIRES.get(cls.__name__))
