"""Registration tables: one rule, shared by every registry, for a name registered twice.

Every registry (presses by name, adapters by ``config.model_type``, and any later one, e.g. model short
names) keeps its entries in a :class:`Table`. An entry remembers its *origin*: ``"kvpress_ext"`` for the
built-ins, the entry-point name for a plugin, the defining module's package for user code. The rule:

* a free key is registered;
* the same origin registering a key again replaces its own entry (reloading is harmless);
* a key held by another origin is refused with :class:`RegistrationConflict`, which names both origins,
  unless the caller passes ``override=True``; the new entry then records whom it overrides, so
  ``kvpress-ext list`` / ``describe`` can say "overrides built-in".

Why: without the rule a plugin registering ``"snapkv"`` or an adapter for ``"llama"`` silently replaced
the built-in. This module imports nothing of the registries or the plugin loader, so they all depend on
it and not on each other; the loader installs itself with :func:`set_loader` and the registries call
:func:`ensure_loaded` before they are read.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from kvpress_ext.core.errors import KVPressExtError

#: The origin of everything kvpress_ext (and kvpress) registers itself.
BUILTIN = "kvpress_ext"


def origin_label(origin: str) -> str:
    """``built-in`` for :data:`BUILTIN`, ``plugin 'name'`` otherwise."""
    return "built-in" if origin == BUILTIN else f"plugin {origin!r}"


#: Every registry's keys: ASCII only, so no two names look alike on screen.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


class InvalidName(KVPressExtError):
    """A registry key that is not an ASCII name."""


class RegistrationConflict(KVPressExtError):
    """A key another origin already holds, registered without ``override=True``."""

    def __init__(self, kind: str, key: str, origin: str, holder: str, what: str = "", held: str = ""):
        self.kind, self.key, self.origin, self.holder = kind, key, origin, holder
        new = f"{origin_label(origin)}" + (f" ({what})" if what else "")
        old = f"{origin_label(holder)}" + (f" ({held})" if held else "")
        super().__init__(
            f"{kind} {key!r} from {new} is already registered by {old}; refused. Register it with "
            f"override=True to replace it on purpose, or choose another {kind} name."
        )


@dataclass
class Registration:
    """One entry of a :class:`Table`: the value, who registered it, and whom it replaced (``override=True``)."""

    key: str
    value: Any
    origin: str
    #: The origin of the entry this one replaced with ``override=True`` (None: it replaced nobody).
    overrides: str | None = None
    #: The replaced entry itself, restored when this origin's entries are removed.
    replaced: Registration | None = None

    @property
    def override_note(self) -> str:
        """``overrides built-in`` (or ``overrides plugin 'x'``), or "" when nothing was replaced."""
        return f"overrides {origin_label(self.overrides)}" if self.overrides else ""


def _without_origin(entry: Registration | None, origin: str) -> Registration | None:
    """``entry`` and the chain of entries it replaced, with every entry of ``origin`` left out."""
    if entry is None:
        return None
    rest = _without_origin(entry.replaced, origin)
    if entry.origin == origin:
        return rest
    if rest is entry.replaced:
        return entry
    return Registration(entry.key, entry.value, entry.origin, rest.origin if rest else None, rest)


_TABLES: list[Table] = []


class Table:
    """A registry's entries by key, applying the collision rule of this module on :meth:`add`."""

    def __init__(self, kind: str, describe: Callable[[Any], str] | None = None):
        #: What a key names, for messages: ``"press"``, ``"adapter for model_type"``, ``"model"``.
        self.kind = kind
        self._describe = describe or (lambda value: "")
        self._entries: dict[str, Registration] = {}
        _TABLES.append(self)

    def add(self, key: str, value: Any, *, origin: str, override: bool = False) -> Registration:
        """Register ``value`` under ``key`` for ``origin``; raises :class:`RegistrationConflict` (see module doc)."""
        self.check(key, value, origin=origin, override=override)
        current = self._entries.get(key)
        if current is None:
            entry = Registration(key, value, origin)
        elif current.origin == origin:  # the same origin again: replace its own entry, keep what it overrode
            entry = Registration(key, value, origin, current.overrides, current.replaced)
        else:
            entry = Registration(key, value, origin, current.origin, current)
        self._entries[key] = entry
        return entry

    def check(self, key: str, value: Any, *, origin: str, override: bool = False) -> None:
        """Raise :class:`RegistrationConflict` if :meth:`add` would refuse; change nothing. A key must be an ASCII
        name (:data:`NAME`): a look-alike of another name (a Cyrillic ``о``, fullwidth letters) is refused."""
        if not isinstance(key, str) or not NAME.fullmatch(key):
            raise InvalidName(f"{self.kind} name {key!r} is invalid: use ASCII letters, digits, '_', '-' or '.', "
                              "starting with a letter or digit (at most 100 characters).")
        current = self._entries.get(key)
        if current is not None and current.origin != origin and not override:
            raise RegistrationConflict(self.kind, key, origin, current.origin,
                                       self._describe(value), self._describe(current.value))

    def remove_origin(self, origin: str) -> None:
        """Drop every entry of ``origin``, bringing back what those entries had overridden.

        Entries of ``origin`` are also dropped from what other origins' entries replaced: removing a plugin
        that was itself overridden must not bring it back when the one overriding it goes too.
        """
        for key, entry in list(self._entries.items()):
            kept = _without_origin(entry, origin)
            if kept is None:
                del self._entries[key]
            else:
                self._entries[key] = kept

    def get(self, key: str) -> Registration | None:
        return self._entries.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        return list(self._entries)

    def entries(self) -> list[Registration]:
        return list(self._entries.values())

    def snapshot(self) -> dict[str, Registration]:
        return dict(self._entries)

    def restore(self, snapshot: dict[str, Registration]) -> None:
        self._entries = dict(snapshot)


def snapshot_all() -> list[tuple[Table, dict]]:
    """The state of every table, to undo a plugin that fails half-way (see :func:`restore_all`)."""
    return [(table, table.snapshot()) for table in _TABLES]


def restore_all(state: list[tuple[Table, dict]]) -> None:
    for table, snapshot in state:
        table.restore(snapshot)


def remove_origin_everywhere(origin: str) -> None:
    for table in _TABLES:
        table.remove_origin(origin)


# --- who is registering ----------------------------------------------------------------------------------------
_current_origin: ContextVar[str | None] = ContextVar("kvpress_ext_registering_origin", default=None)


@contextlib.contextmanager
def registering_as(origin: str) -> Iterator[None]:
    """Everything registered inside (a plugin's import and hooks) belongs to ``origin``, whatever it claims."""
    token = _current_origin.set(origin)
    try:
        yield
    finally:
        _current_origin.reset(token)


def _package(module: str) -> str:
    package = (module or "").split(".")[0]
    return BUILTIN if package in (BUILTIN, "kvpress") else (package or "unknown")


def caller_module() -> str:  # pragma: no mutate block (mutmut's wrapper would add a frame; tests check it)
    """The ``__name__`` of the module that called the function calling this (e.g. who called ``add_press``)."""
    return sys._getframe(2).f_globals.get("__name__", "")


def resolve_origin(source: str | None, module: str, *, self_registration: bool = False) -> str:
    """The origin of a registration: the plugin being loaded, else ``source``, else the package of ``module`` (the
    module that registers; kvpress_ext and kvpress count as built-in).

    ``self_registration``: a class decorating itself at import (``@register_press``), ``module`` being its own; one
    of kvpress_ext's modules is built-in even when a plugin's import happens to import it first.
    """
    if self_registration and _package(module) == BUILTIN:
        return BUILTIN
    return _current_origin.get() or source or _package(module)


# --- lazy loading of the plugins -----------------------------------------------------------------------------
_loader: Callable[[], None] | None = None


def set_loader(loader: Callable[[], None]) -> None:
    """Installed by :mod:`kvpress_ext.plugins.loader`: called by :func:`ensure_loaded` before a registry is read."""
    global _loader
    _loader = loader


def ensure_loaded() -> None:
    if _loader is not None:
        _loader()
