"""The press registry: one table from a name to a press class.

Everything that takes a press by name (the CLI, the evaluation scripts, A3's eviction step) goes
through :func:`get_press`, so name lookup, parameter checking and documentation live in one place.
Presses register with the :func:`register_press` decorator (ours), through the plugin hook
``kvpress_ext_register_presses`` (third parties), or in :mod:`kvpress_ext.core.kvpress_table` (kvpress's own).
A name another origin already holds is refused unless registered with ``override=True`` (the rule of
:mod:`kvpress_ext.core.tables`, shared by every registry).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvpress_ext.core import tables
from kvpress_ext.core.contract import composed_presses
from kvpress_ext.core.errors import NoCompressionWarning, PressParameterError, UnknownPressError
from kvpress_ext.core.temporal_order import keep_token_order

#: Parameter names whose value must lie in [0, 1).
RATIO_PARAMETERS = ("compression_ratio",)
#: The compression ratio of a press built by name without one (get_press, the CLI, sweeps): half the cache.
#: kvpress's classes default to 0.0, which compresses nothing; one default everywhere avoids silent no-ops.
DEFAULT_COMPRESSION_RATIO = 0.5
#: Parameters that get :data:`DEFAULT_COMPRESSION_RATIO` when not given (ThinK removes key channels, DuoAttention
#: heads: their ratio means the same "fraction removed", and 0.0 would compress nothing).
DEFAULT_RATIO_PARAMETERS = ("compression_ratio", "key_channel_compression_ratio", "head_compression_ratio")
#: Parameter names whose value must be a positive integer.
POSITIVE_INT_PARAMETERS = ("budget", "target_size", "window_size", "kernel_size", "compression_interval", "window",
                           "chunk_length", "chunk_size", "block_size", "low_entropy_chunk_length", "lag_size",
                           "local_window_size", "merge_budget", "pool_width", "sketch_dimension", "num_samples",
                           "sample_seq_len", "hidden_states_buffer_size", "sliding_window_size", "n_last")
#: Integer parameters that count tokens, layers or positions: never above :data:`MAX_SIZE` (a saved file or a
#: command line asking for 10**12 would otherwise spin for minutes) and never negative.
SIZE_PARAMETERS = ("n_sink", "sink", "num_sinks", "n_initial", "n_recent", "n_future_positions", "slack",
                   "cap_total", "initial_non_compressible_length", "keep_token_lower_bound", "sink_size_start",
                   "sink_size_end", "beta", "rotation_offset", "selection_layer")
MAX_SIZE = 1 << 24
#: Pooling windows centred on a token: an even width would shift the scores by one (kvpress pads width // 2).
ODD_PARAMETERS = ("kernel_size",)
#: Fractions other than the compression ratio: in [0, 1].
FRACTION_PARAMETERS = ("rate", "retain_ratio", "first_stage_ratio", "window_ratio", "merge_fraction",
                       "target_compression_ratio", "alpha_safeguard", "similarity_threshold")
_SNAKE = re.compile(r"[a-z][a-z0-9_]{0,99}")


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
    #: The origin of the entry this one replaced with ``override=True`` (None: it replaced nothing).
    overrides: str | None = None

    @property
    def override_note(self) -> str:
        """``overrides built-in`` when this press replaced another origin's press of the same name, else ""."""
        return f"overrides {tables.origin_label(self.overrides)}" if self.overrides else ""

    @property
    def summary(self) -> str:
        """The docstring's first sentence (it may span lines), for one-line listings."""
        return first_sentence(inspect.getdoc(self.cls) or "")

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.cls) or ""

    @property
    def parameters(self) -> list[PressParameter]:
        """The constructor's parameters (the dataclass fields, or a hand-written ``__init__``'s arguments)."""
        return constructor_parameters(self.cls)

    @property
    def build_defaults(self) -> dict:
        """What :func:`get_press` fills in when a parameter is not given: the registered ``defaults``, and
        :data:`DEFAULT_COMPRESSION_RATIO` for a press with a ``compression_ratio`` parameter."""
        out = dict(self.defaults)
        names = {p.name for p in self.parameters}
        for key in DEFAULT_RATIO_PARAMETERS:
            if key in names and key not in out:
                out[key] = DEFAULT_COMPRESSION_RATIO
        return out

    @property
    def effective_parameters(self) -> list[PressParameter]:
        """:attr:`parameters` with the defaults a press built by name gets (what ``kvpress-ext list`` shows)."""
        defaults = self.build_defaults
        return [dataclasses.replace(p, default=defaults[p.name], required=False) if p.name in defaults else p
                for p in self.parameters]


def _class_path(info: PressInfo) -> str:
    return f"{info.cls.__module__}.{info.cls.__qualname__}"


_PRESSES = tables.Table("press", describe=_class_path)


def first_sentence(doc: str) -> str:
    """The first sentence of a docstring's first paragraph, on one line (whole paragraph if it has no full stop).

    A full stop ends a sentence when followed by whitespace and not part of an abbreviation (``e.g.``, ``et al.``,
    ``i.e.``, ``vs.``, ``Fig.``) or a decimal number; a trailing colon (a list follows) counts as an end too."""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    paragraph = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", paragraph).replace("``", "")  # reST roles and literals
    if not paragraph:
        return ""
    abbreviations = ("e.g.", "i.e.", "et al.", "vs.", "etc.", "Fig.", "cf.", "approx.")
    for match in re.finditer(r"[.!?:](?=\s|$)", paragraph):
        end = match.end()
        head = paragraph[:end]
        if any(head.endswith(a) for a in abbreviations) and end < len(paragraph):
            continue
        if paragraph[match.start()] == ":" and end < len(paragraph):
            continue
        return head.rstrip(":") + ("." if head.endswith(":") else "")
    return paragraph


def constructor_parameters(cls: type) -> list[PressParameter]:
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):
        return []
    params = []
    for p in signature.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name.startswith("_"):
            continue
        required = p.default is inspect.Parameter.empty
        default = None if required else p.default
        annotation = "" if p.annotation is inspect.Parameter.empty else _type_name(p.annotation)
        params.append(PressParameter(p.name, annotation, default, required))
    return params


def _type_name(t: Any) -> str:
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def register_press(
    name: str, *, source: str | None = None, defaults: dict | None = None, requires: str | None = None,
    override: bool = False,
) -> Callable[[type], type]:
    """Class decorator: register ``cls`` under ``name`` (snake_case); see :func:`add_press` for the rule on taken names."""

    def decorator(cls: type) -> type:
        origin = tables.resolve_origin(source, cls.__module__, self_registration=True)
        _add(name, cls, origin, defaults, requires, override)
        return cls

    return decorator


def add_press(
    name: str, cls: type, *, source: str | None = None, defaults: dict | None = None, requires: str | None = None,
    override: bool = False,
) -> PressInfo:  # pragma: no mutate block (mutmut's wrapper would be the caller_module; tests check the origin)
    """Register ``cls`` under ``name``; the functional form of :func:`register_press`.

    ``source`` names the origin (default: the plugin being loaded, else the calling package). A name
    that another origin already registered is refused with :class:`~kvpress_ext.core.tables.RegistrationConflict`
    naming both; ``override=True`` replaces it, and ``kvpress-ext list`` then marks the press "overrides built-in".
    """
    origin = tables.resolve_origin(source, tables.caller_module())
    return _add(name, cls, origin, defaults, requires, override)


def _add(name, cls, origin: str, defaults, requires, override: bool) -> PressInfo:
    if not isinstance(name, str) or not _SNAKE.fullmatch(name):
        raise PressParameterError(f"Press name {name!r} is not snake_case: use lowercase letters, digits and '_'.")
    if not inspect.isclass(cls):
        raise PressParameterError(f"register_press({name!r}) needs a class, got {cls!r}.")
    info = PressInfo(name=name, cls=cls, source=origin, defaults=dict(defaults or {}), requires=requires)
    info.overrides = _PRESSES.add(name, info, origin=origin, override=override).overrides
    return info


def _presses() -> dict[str, PressInfo]:
    return {entry.key: entry.value for entry in _PRESSES.entries()}


def _ensure_loaded() -> None:
    tables.ensure_loaded()


def available_presses() -> dict[str, PressInfo]:
    """All registered presses by name (sorted), including ``no_press`` and plugin presses."""
    _ensure_loaded()
    return dict(sorted(_presses().items()))


def press_info(name: str) -> PressInfo:
    """The registry entry for ``name``; an unknown name raises an error that lists the closest names."""
    _ensure_loaded()
    entry = _PRESSES.get(name) if isinstance(name, str) else None
    if entry is not None:
        return entry.value
    close = difflib.get_close_matches(str(name), _PRESSES.keys(), n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownPressError(
        f"Unknown press {name!r}.{hint} Run `kvpress-ext list` to see all {len(_PRESSES)} registered presses."
    )


def press_name(press: Any) -> str:
    """The registry name of a press instance (or class); the class name if it is not registered."""
    _ensure_loaded()
    cls = press if inspect.isclass(press) else type(press)
    for name, info in _presses().items():
        if info.cls is cls:
            return name
    return cls.__name__


def validate_parameters(cls: type, params: dict, name: str | None = None) -> None:
    """Check names and ranges of ``params`` against the press dataclass before building it."""
    label = name or cls.__name__
    valid = {p.name for p in constructor_parameters(cls)}
    if valid or dataclasses.is_dataclass(cls):
        unknown = sorted(set(params) - valid)
        if unknown:
            raise PressParameterError(
                f"Press {label!r} has no parameter {', '.join(map(repr, unknown))}. "
                f"Its parameters are: {', '.join(sorted(valid)) or '(none)'}."
            )
    for key, value in params.items():
        if key in RATIO_PARAMETERS and value is not None and (
            not isinstance(value, (int, float)) or not 0 <= float(value) < 1
        ):
            raise PressParameterError(
                f"{label}: {key}={value!r} is out of range; it must be a number in [0, 1) "
                "(the fraction of the cache to remove)."
            )
        check_parameter(label, key, value)


def check_parameter(label: str, key: str, value) -> None:
    """One parameter's range (see the tables above); every number must be finite. Also applied to parameters read
    back from a saved file, which are as untrusted as a command line."""
    sized = key in POSITIVE_INT_PARAMETERS or key in SIZE_PARAMETERS
    if value is None or isinstance(value, bool) and not sized:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise PressParameterError(f"{label}: {key}={value!r} is invalid; pass a finite number.")
    if sized and (isinstance(value, bool) or not isinstance(value, int)):
        raise PressParameterError(f"{label}: {key}={value!r} is invalid; it must be a positive integer."
                                  if key in POSITIVE_INT_PARAMETERS else
                                  f"{label}: {key}={value!r} is invalid; pass a whole number of tokens.")
    if key in POSITIVE_INT_PARAMETERS and value <= 0:
        raise PressParameterError(f"{label}: {key}={value!r} is invalid; it must be a positive integer.")
    if sized and not -MAX_SIZE <= value <= MAX_SIZE or key in SIZE_PARAMETERS and key != "rotation_offset" and value < 0:
        raise PressParameterError(f"{label}: {key}={value!r} is out of range; pass a whole number in [0, {MAX_SIZE}].")
    if key in ODD_PARAMETERS and value % 2 == 0:
        raise PressParameterError(f"{label}: {key}={value!r} is invalid; it must be odd (a window centred on each "
                                  f"token), e.g. {value + 1}.")
    if key in FRACTION_PARAMETERS and (not isinstance(value, (int, float)) or not 0 <= value <= 1):
        raise PressParameterError(f"{label}: {key}={value!r} is out of range; pass a number in [0, 1].")


def _resolve_nested(cls: type, params: dict) -> dict:
    """Build inner presses given by name: ``get_press("key_rerotation", press="knorm", compression_ratio=.5)``.

    A wrapper parameter that holds a press (``press``, ``base_press``, ``presses``) may be given as a
    registry name; keyword arguments the wrapper lacks go to every inner press that has them.
    """
    own = {p.name for p in constructor_parameters(cls)}
    nested_keys = [k for k in ("press", "base_press", "presses") if k in own]
    if not nested_keys:
        return params
    params = dict(params)
    leftovers = {k: params.pop(k) for k in list(params) if k not in own}
    consumed: set[str] = set()

    def build(name: str):
        fields = {p.name for p in constructor_parameters(press_info(name).cls)}
        inner = {k: v for k, v in leftovers.items() if k in fields}
        consumed.update(inner)
        with warnings.catch_warnings():  # an idle inner press is reported once, for the press the user named
            warnings.simplefilter("ignore", NoCompressionWarning)
            return get_press(name, **inner)

    for key in nested_keys:
        value = params.get(key)
        if isinstance(value, str):
            params[key] = build(value)
        elif isinstance(value, (list, tuple)):
            params[key] = [build(v) if isinstance(v, str) else v for v in value]
    params.update({k: v for k, v in leftovers.items() if k not in consumed})  # reported by validate_parameters
    return params


def get_press(name: str, **params: Any):
    """Build the press registered as ``name`` with ``params``; ``no_press`` returns None (no compression).

    Errors name the fix: an unknown name lists the closest names, an unknown parameter lists the
    press's parameters, and a ratio or budget out of range names the valid range.
    """
    info = press_info(name)
    if info.cls is NoPress:
        if any(v not in (None, 0, 0.0) for v in params.values()):
            raise PressParameterError(f"Press 'no_press' takes no parameters (got {', '.join(params)}); leave them out "
                                      "or choose a press that compresses.")
        return None
    merged = {**info.build_defaults, **params}
    merged = _resolve_nested(info.cls, merged)
    validate_parameters(info.cls, merged, name)
    try:
        press = info.cls(**merged)
    except AssertionError as exc:  # kvpress validates with asserts
        raise PressParameterError(f"{name}: invalid parameters {merged!r}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        if isinstance(exc, PressParameterError):
            raise
        raise PressParameterError(f"{name}: invalid parameters {merged!r}: {exc}") from exc
    except Exception as exc:  # a plugin press whose constructor fails in another way: one line, not a traceback
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise PressParameterError(f"{name} could not be built ({type(exc).__name__}{': ' + first if first else ''}); "
                                  f"fix its parameters, or choose another press (`kvpress-ext list`).") from exc

    press = keep_token_order(press)  # wrappers that compress a compressed cache again: entries in token order
    idle = compresses_nothing(press)
    if idle:
        warnings.warn(f"{name} is configured to compress nothing ({idle}): the cache is kept whole. Pass e.g. "
                      f"compression_ratio={DEFAULT_COMPRESSION_RATIO} to compress.", NoCompressionWarning, stacklevel=2)
    return press


def compresses_nothing(press) -> str | None:
    """Why ``press`` as configured removes nothing (``"compression_ratio=0"``), or None. A press is judged by its
    ratio (wrappers such as AdaKV forward their inner press's); a composition of presses by all of them. Presses
    sized otherwise (a budget, a target size, a threshold) are not judged."""
    for key in DEFAULT_RATIO_PARAMETERS:
        try:
            ratio = getattr(press, key, None)
        except Exception:  # noqa: BLE001 - some presses compute it from a forward pass and raise before one
            ratio = None
        if isinstance(ratio, (int, float)) and not isinstance(ratio, bool):
            return f"{key}={ratio}" if ratio == 0 else None
    inner = composed_presses(press)
    reasons = [compresses_nothing(p) for p in inner]
    return reasons[0] if inner and all(reasons) else None


class NoPress:
    """No compression: the full KV cache (the reference every press is measured against)."""


add_press("no_press", NoPress)
