"""Model adapters: one small interface per architecture family, chosen from ``config.model_type``."""

from __future__ import annotations

from kvpress_ext.adapters.base import AttentionShape, ModelAdapter
from kvpress_ext.errors import UnsupportedModelError

_ADAPTERS: list[ModelAdapter] = []


def add_adapter(adapter: ModelAdapter) -> None:
    """Register an adapter instance; a later one for the same model_type takes precedence."""
    if not isinstance(adapter, ModelAdapter):
        raise TypeError(f"add_adapter needs a ModelAdapter instance, got {adapter!r}")
    _ADAPTERS[:] = [a for a in _ADAPTERS if a.name != adapter.name]
    _ADAPTERS.insert(0, adapter)


def available_adapters() -> list[ModelAdapter]:
    from kvpress_ext.plugins import load_plugins

    load_plugins()
    return sorted(_ADAPTERS, key=lambda a: a.name)


def get_adapter(model) -> ModelAdapter:
    """The adapter for ``model`` (the latest registered for its model_type); an unsupported model gets an
    error naming the families and the fix."""
    from kvpress_ext.plugins import load_plugins

    load_plugins()
    for adapter in _ADAPTERS:  # registration order, newest first (available_adapters sorts by name)
        if adapter.matches(model):
            return adapter
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    supported = sorted({t for a in _ADAPTERS for t in a.model_types})
    raise UnsupportedModelError(
        f"No kvpress_ext adapter for model_type {model_type!r} ({type(model).__name__}). Supported: "
        f"{', '.join(supported)}. To add one, subclass kvpress_ext.adapters.ModelAdapter and register it "
        "from a plugin's `kvpress_ext_register_adapters` hook (see README, 'Writing a plugin')."
    )


__all__ = ["AttentionShape", "ModelAdapter", "add_adapter", "available_adapters", "get_adapter"]
