"""Model adapters: one small interface per architecture family, chosen from ``config.model_type``.

Each ``model_type`` belongs to one adapter. An adapter claiming a model type another origin already drives is
refused unless registered with ``override=True`` (the rule of :mod:`kvpress_ext.core.tables`), so a plugin
cannot silently take over every Llama model.
"""

from __future__ import annotations

from kvpress_ext.core import tables
from kvpress_ext.core.adapters.base import AttentionShape, ModelAdapter
from kvpress_ext.core.errors import UnsupportedModelError


def _adapter_path(adapter: ModelAdapter) -> str:
    return f"{type(adapter).__module__}.{type(adapter).__qualname__} {adapter.name!r}"


_MODEL_TYPES = tables.Table("adapter for model_type", describe=_adapter_path)


def add_adapter(adapter: ModelAdapter, *, source: str | None = None, override: bool = False) -> None:
    """Register an adapter instance for each of its ``model_types``.

    A model type another origin already registered is refused (nothing of this adapter is registered) with a
    :class:`~kvpress_ext.core.tables.RegistrationConflict` naming both origins; ``override=True`` takes it over.
    """
    if not isinstance(adapter, ModelAdapter):
        raise TypeError(
            f"add_adapter needs a ModelAdapter instance (e.g. MyAdapter(), not the class), got {adapter!r}"
        )
    if not adapter.model_types or not all(isinstance(t, str) and t for t in adapter.model_types):
        raise TypeError(f"adapter {adapter.name!r} must name the config.model_type values it drives in model_types")
    origin = tables.resolve_origin(source, tables.caller_module())
    for model_type in adapter.model_types:  # all or nothing
        _MODEL_TYPES.check(model_type, adapter, origin=origin, override=override)
    for model_type in adapter.model_types:
        _MODEL_TYPES.add(model_type, adapter, origin=origin, override=override)


def adapter_registrations() -> list[tables.Registration]:
    """One entry per model type (sorted): the adapter, its origin, and whom it overrides (``kvpress-ext list``)."""
    tables.ensure_loaded()
    return sorted(_MODEL_TYPES.entries(), key=lambda e: e.key)


def available_adapters() -> list[ModelAdapter]:
    """Every registered adapter that drives at least one model type, sorted by name."""
    tables.ensure_loaded()
    unique = {id(e.value): e.value for e in _MODEL_TYPES.entries()}
    return sorted(unique.values(), key=lambda a: a.name)


def get_adapter(model) -> ModelAdapter:
    """The adapter for ``model``; an unsupported model gets an error naming the families and the fix."""
    tables.ensure_loaded()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    entry = _MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None
    if entry is not None:
        return entry.value
    for adapter in available_adapters():  # adapters with their own matches()
        if adapter.matches(model):
            return adapter
    supported = sorted(_MODEL_TYPES.keys())
    raise UnsupportedModelError(
        f"No kvpress_ext adapter for model_type {model_type or type(model).__name__!r} ({type(model).__name__}). "
        f"Supported: {', '.join(supported)}. To add one, subclass kvpress_ext.core.adapters.ModelAdapter and register an "
        "instance from a plugin's `kvpress_ext_register_adapters` hook (see README, 'Writing a plugin')."
    )


__all__ = [
    "AttentionShape",
    "ModelAdapter",
    "adapter_registrations",
    "add_adapter",
    "available_adapters",
    "get_adapter",
]
