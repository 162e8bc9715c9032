"""``kvpress-ext list`` and ``kvpress-ext describe NAME``: what the registries hold, who registered it, and which
plugins failed (each failure printed once, here, instead of also as a log warning)."""

from __future__ import annotations

import logging

from kvpress_ext.registration import BUILTIN


def _load_quietly() -> None:
    """Load the plugins with their failure warnings off: these commands print the failures themselves."""
    from kvpress_ext.plugins import load_plugins, logger

    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        load_plugins()
    finally:
        logger.setLevel(level)


def _origin(source: str, note: str) -> str:
    parts = ([] if source == BUILTIN else [f"from {source}"]) + ([note] if note else [])
    return f"  ({', '.join(parts)})" if parts else ""


def _cmd_list(args) -> int:
    from kvpress_ext.adapters import adapter_registrations
    from kvpress_ext.plugins import failed_plugins
    from kvpress_ext.registry import available_presses

    _load_quietly()
    presses = available_presses()
    print(f"Presses ({len(presses)}):")
    for name, info in presses.items():
        params = ", ".join(str(p) for p in info.parameters)
        note = f"  [needs: {info.requires}]" if info.requires else ""
        print(f"  {name:24s} {info.summary}{_origin(info.source, info.override_note)}{note}")
        if params:
            print(f"  {'':24s}   params: {params}")
    adapters: dict[int, list] = {}
    for entry in adapter_registrations():
        adapters.setdefault(id(entry.value), []).append(entry)
    print(f"\nModel adapters ({len(adapters)}):")
    for entries in sorted(adapters.values(), key=lambda es: es[0].value.name):
        notes = [f"{e.override_note} for {e.key}" for e in entries if e.override_note]
        print(f"  {entries[0].value.describe()}{_origin(entries[0].origin, '; '.join(notes))}")
    failures = failed_plugins()
    if failures:
        print("\nPlugins that failed to load:")
        for f in failures:
            print(f"  {f.name}: {f.reason}")
    return 0


def _cmd_describe(args) -> int:
    from kvpress_ext.registry import press_info

    _load_quietly()
    info = press_info(args.name)
    origin = "built-in" if info.source == BUILTIN else f"from plugin {info.source}"
    note = f", {info.override_note}" if info.override_note else ""
    print(f"{info.name}  ({info.cls.__module__}.{info.cls.__name__}, {origin}{note})\n")
    print(info.doc)
    print("\nParameters:")
    for p in info.parameters:
        print(f"  {p.name}: {p.type}" + ("" if p.required else f" = {p.default!r}"))
    if info.defaults:
        print(f"\nDefaults used when built by name without arguments: {info.defaults}")
    if info.requires:
        print(f"\nNeeds: {info.requires}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("list", help="list registered presses and model adapters")
    p.set_defaults(func=_cmd_list)
    p = subparsers.add_parser("describe", help="print one press's documentation and parameters")
    p.add_argument("name", help="registered press name (see `kvpress-ext list`)")
    p.set_defaults(func=_cmd_describe)
