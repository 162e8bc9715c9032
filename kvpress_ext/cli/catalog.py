"""``kvpress-ext list`` and ``kvpress-ext describe NAME``: what the registries hold (presses, adapters, models), who
registered it, and which plugins failed (each failure printed once, here, instead of also as a log warning)."""

from __future__ import annotations

import inspect
import logging
import re
import textwrap

from kvpress_ext.core.adapters import adapter_registrations
from kvpress_ext.core.contract import sized_by_budget
from kvpress_ext.core.registry import available_presses, press_info
from kvpress_ext.core.tables import BUILTIN
from kvpress_ext.plugins.loader import failed_plugins, load_plugins, logger
from kvpress_ext.runtime.models import _MODELS, DEFAULT_MODEL, available_models, model_status


def _load_quietly() -> None:
    """Load the plugins with their failure warnings off: these commands print the failures themselves."""
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        load_plugins()
    finally:
        logger.setLevel(level)


def _origin(source: str, note: str) -> str:
    parts = ([] if source == BUILTIN else [f"from {source}"]) + ([note] if note else [])
    return f"  ({', '.join(parts)})" if parts else ""
#: Width of ``kvpress-ext list`` lines (summaries and parameter lists longer than that wrap, indented).
WIDTH = 110


def _wrapped(first: str, text: str) -> str:
    """``first`` then ``text`` wrapped to WIDTH, continuation lines indented as far as ``first``."""
    lines = textwrap.wrap(text, WIDTH, initial_indent=first, subsequent_indent=" " * len(first),
                          break_on_hyphens=False, break_long_words=False)
    return "\n".join(lines) or first


def _cmd_list(args) -> int:
    _load_quietly()
    presses = available_presses()
    print(f"Presses ({len(presses)}):")
    for name, info in presses.items():
        params = ", ".join(str(p) for p in info.effective_parameters)
        note = f" [needs: {info.requires}]" if info.requires else ""
        source = _origin(info.source, info.override_note)
        if len(name) > 24:  # the summary starts on the next line, in its column
            print(f"  {name}")
        print(_wrapped(f"  {name if len(name) <= 24 else '':24s} ", f"{info.summary}{source}{note}"))
        if params:
            print(_wrapped(f"  {'':24s}   params: ", params))
    adapters: dict[int, list] = {}
    for entry in adapter_registrations():
        adapters.setdefault(id(entry.value), []).append(entry)
    print(f"\nModel adapters ({len(adapters)}):")
    for entries in sorted(adapters.values(), key=lambda es: es[0].value.name):
        notes = [f"{e.override_note} for {e.key}" for e in entries if e.override_note]
        print(f"  {entries[0].value.describe()}{_origin(entries[0].origin, '; '.join(notes))}")
    _list_models()
    failures = failed_plugins()
    if failures:
        print("\nPlugins that failed to load:")
        for f in failures:
            print(f"  {f.name}: {f.reason}")
    return 0


def _list_models() -> None:
    models = available_models()
    print(f"\nModels by short name ({len(models)}; --model also takes a local directory or a hub id):")
    for name, info in models.items():
        context = f"{info.context:,}" if info.context else "?"
        default = "  (default)" if name == DEFAULT_MODEL else ""
        entry = _MODELS.get(name)
        origin = _origin(entry.origin, entry.override_note) if entry is not None else ""
        print(f"  {name:24s} {info.parameters or '?'} parameters, context {context} tokens, {info.licence or '?'}"
              f"{default}{origin}")
        if info.summary:
            print(_wrapped(f"  {'':24s}   ", info.summary))
        print(_wrapped(f"  {'':24s}   source: ", info.source or "?"))
        status = model_status(info)
        if status:
            print(_wrapped(f"  {'':24s}   status: ", status))


def _cmd_describe(args) -> int:
    _load_quietly()
    info = press_info(args.name)
    origin = "built-in" if info.source == BUILTIN else f"from plugin {info.source}"
    note = f", {info.override_note}" if info.override_note else ""
    print(f"{info.name}  ({info.cls.__module__}.{info.cls.__name__}, {origin}{note})\n")
    print(info.doc)
    documented = _documented_parameters(info.doc)
    rest = [p for p in info.parameters if p.name not in documented]
    if rest:  # the docstring's own Parameters section already lists the others
        print("\nParameters:" if not documented else "\nOther parameters:")
        for p in rest:
            print(f"  {p.name}: {p.type}" + ("" if p.required else f" = {p.default!r}"))
    class_defaults = {p.name: p.default for p in info.parameters}
    changed = {k: v for k, v in info.build_defaults.items() if class_defaults.get(k, object()) != v}
    if changed:
        items = ", ".join(f"{k}={v!r}" + ("" if class_defaults.get(k) is None else f" (class default {class_defaults[k]!r})")
                          for k, v in changed.items())
        print(f"\nBuilt by name (`kvpress-ext`, get_press) without them, it gets: {items}")
    if sized_by_budget(info.cls):  # evaluations and sweeps size every press by --compression_ratio
        how = " ".join(inspect.getdoc(info.cls.from_compression_ratio).split())
        print("\nBuilt from a compression ratio (`--compression_ratio` in evaluations and sweeps):")
        print(_wrapped("  ", how))
    if info.requires:
        print(f"\nNeeds: {info.requires}")
    return 0


def _documented_parameters(doc: str) -> set[str]:
    """Names described in a numpy-style ``Parameters`` section (``name : type`` or ``name:`` lines)."""
    match = re.search(r"^Parameters\n-{3,}\n(.*?)(?:\n\S[^\n]*\n-{3,}\n|\Z)", doc, re.DOTALL | re.MULTILINE)
    if not match:
        return set()
    return set(re.findall(r"^(\w+)\s*:", match.group(1), re.MULTILINE))


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("list", help="list registered presses, model adapters and model short names")
    p.set_defaults(func=_cmd_list)
    p = subparsers.add_parser("describe", help="print one press's documentation and parameters")
    p.add_argument("name", help="registered press name (see `kvpress-ext list`)")
    p.set_defaults(func=_cmd_describe)
