"""Token ids a model's configuration names, in the one form every decoding loop checks against."""

from __future__ import annotations


def eos_token_ids(model) -> set[int]:
    """The model's end-of-sequence ids as a set: ``generation_config.eos_token_id`` may be one id, a list or None
    (and a model may have no generation config)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
