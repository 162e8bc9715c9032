"""The press registry: one table from a name to a press class.

Everything that takes a press by name (the CLI, the evaluation scripts, A3's eviction step) goes
through :func:`get_press`, so name lookup, parameter checking and documentation live in one place.
Presses register with the :func:`register_press` decorator (ours), through the plugin hook
``kvpress_ext_register_presses`` (third parties), or in :mod:`kvpress_ext.kvpress_presses` (kvpress's own).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from kvpress_ext.errors import PressParameterError, UnknownPressError

#: Parameter names whose value must lie in [0, 1).
RATIO_PARAMETERS = ("compression_ratio",)
#: Parameter names whose value must be a positive integer.
POSITIVE_INT_PARAMETERS = ("budget", "target_size", "window_size", "kernel_size", "compression_interval", "window")


@dataclass(frozen=True)
class PressParameter:
    """One dataclass field of a press, as shown by ``kvpress-ext list``."""

    name: str
    type: str
    default: Any
    required: bool

    def __str__(self) -> str:
        return f"{self.name}" if self.required else f"{self.name}={self.default!r}"


@dataclass
class PressInfo:
    """What the registry knows about a press: its class, where it came from, and how to build a default."""

    name: str
    cls: type
    source: str = "kvpress_ext"
    #: Default keyword arguments used when the press is built with no arguments for tests and sweeps
    #: (wrappers need an inner press, e.g. ``{"press": "knorm"}``).
    defaults: dict = field(default_factory=dict)
    #: Why the press cannot run here, if it needs something unavailable offline (a hub download, a trained model).
    requires: str | None = None

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.cls) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.cls) or ""

    @property
    def parameters(self) -> list[PressParameter]:
        params = []
        if not dataclasses.is_dataclass(self.cls):
            return params
        for f in dataclasses.fields(self.cls):
            if not f.init or f.name.startswith("_"):
                continue
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            default = None
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            params.append(PressParameter(f.name, _type_name(f.type), default, required))
        return params


_REGISTRY: dict[str, PressInfo] = {}


def _type_name(t: Any) -> str:
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def register_press(
    name: str, *, source: str = "kvpress_ext", defaults: dict | None = None, requires: str | None = None
) -> Callable[[type], type]:
    """Class decorator: register ``cls`` under ``name`` (snake_case). Re-registering a name replaces it."""

    def decorator(cls: type) -> type:
        add_press(name, cls, source=source, defaults=defaults, requires=requires)
        return cls

    return decorator


def add_press(
    name: str, cls: type, *, source: str = "kvpress_ext", defaults: dict | None = None, requires: str | None = None
) -> None:
    """Register ``cls`` under ``name``; the functional form of :func:`register_press`."""
    if not name or not name.replace("_", "").isalnum() or name.lower() != name:
        raise PressParameterError(f"Press name {name!r} is not snake_case: use lowercase letters, digits and '_'.")
    if not inspect.isclass(cls):
        raise PressParameterError(f"register_press({name!r}) needs a class, got {cls!r}.")
    _REGISTRY[name] = PressInfo(name=name, cls=cls, source=source, defaults=dict(defaults or {}), requires=requires)


def _ensure_loaded() -> None:
    from kvpress_ext.plugins import load_plugins

    load_plugins()


def available_presses() -> dict[str, PressInfo]:
    """All registered presses by name (sorted), including ``no_press`` and plugin presses."""
    _ensure_loaded()
    return dict(sorted(_REGISTRY.items()))


def press_info(name: str) -> PressInfo:
    """The registry entry for ``name``; an unknown name raises an error that lists the closest names."""
    _ensure_loaded()
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownPressError(
        f"Unknown press {name!r}.{hint} Run `kvpress-ext list` to see all {len(_REGISTRY)} registered presses."
    )


def press_name(press: Any) -> str:
    """The registry name of a press instance (or class); the class name if it is not registered."""
    _ensure_loaded()
    cls = press if inspect.isclass(press) else type(press)
    for name, info in _REGISTRY.items():
        if info.cls is cls:
            return name
    return cls.__name__


def validate_parameters(cls: type, params: dict, name: str | None = None) -> None:
    """Check names and ranges of ``params`` against the press dataclass before building it."""
    label = name or cls.__name__
    if dataclasses.is_dataclass(cls):
        valid = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(params) - valid)
        if unknown:
            raise PressParameterError(
                f"Press {label!r} has no parameter {', '.join(map(repr, unknown))}. "
                f"Its parameters are: {', '.join(sorted(valid)) or '(none)'}."
            )
    for key, value in params.items():
        if key in RATIO_PARAMETERS and value is not None:
            if not isinstance(value, (int, float)) or not 0 <= float(value) < 1:
                raise PressParameterError(
                    f"{label}: {key}={value!r} is out of range; it must be a number in [0, 1) "
                    "(the fraction of the cache to remove)."
                )
        if key in POSITIVE_INT_PARAMETERS and value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise PressParameterError(f"{label}: {key}={value!r} is invalid; it must be a positive integer.")


def _resolve_nested(cls: type, params: dict) -> dict:
    """Build inner presses given by name: ``get_press("key_rerotation", press="knorm", compression_ratio=.5)``.

    A parameter annotated as a press (``press``, ``base_press``, ``presses``) may be given as a registry
    name; remaining keyword arguments that the wrapper lacks but the inner press has are passed inwards.
    """
    hints = {}
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - some annotations only resolve lazily
        pass
    own = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set(params)
    nested_keys = [k for k in ("press", "base_press", "presses") if k in own]
    if not nested_keys:
        return params
    params = dict(params)
    leftovers = {k: params.pop(k) for k in list(params) if k not in own}
    for key in nested_keys:
        value = params.get(key)
        if isinstance(value, str):
            params[key] = get_press(value, **_take_params_for(value, leftovers))
        elif isinstance(value, (list, tuple)) and any(isinstance(v, str) for v in value):
            params[key] = [get_press(v, **_take_params_for(v, leftovers)) if isinstance(v, str) else v for v in value]
    _ = hints
    params.update(leftovers)  # anything not consumed is reported by validate_parameters
    return params


def _take_params_for(name: str, leftovers: dict) -> dict:
    info = press_info(name)
    fields = {f.name for f in dataclasses.fields(info.cls)} if dataclasses.is_dataclass(info.cls) else set()
    return {k: leftovers.pop(k) for k in list(leftovers) if k in fields}


def get_press(name: str, **params: Any):
    """Build the press registered as ``name`` with ``params``; ``no_press`` returns None (no compression).

    Errors name the fix: an unknown name lists the closest names, an unknown parameter lists the
    press's parameters, and a ratio or budget out of range names the valid range.
    """
    info = press_info(name)
    if info.cls is NoPress:
        if any(v not in (None, 0, 0.0) for v in params.values()):
            raise PressParameterError(f"Press 'no_press' takes no parameters (got {', '.join(params)}).")
        return None
    merged = {**info.defaults, **params}
    merged = _resolve_nested(info.cls, merged)
    validate_parameters(info.cls, merged, name)
    try:
        return info.cls(**merged)
    except AssertionError as exc:  # kvpress validates with asserts
        raise PressParameterError(f"{name}: invalid parameters {merged!r}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        if isinstance(exc, PressParameterError):
            raise
        raise PressParameterError(f"{name}: invalid parameters {merged!r}: {exc}") from exc


class NoPress:
    """No compression: the full KV cache (the reference every press is measured against)."""


add_press("no_press", NoPress)
