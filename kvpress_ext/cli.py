"""The ``kvpress-ext`` command line: ``list``, ``describe NAME``, and subcommands that modules add
(``icl``, ``a3``, ``generate``).

A subcommand module exposes ``add_parser(subparsers)`` which registers its parser with
``set_defaults(func=...)``; :data:`SUBCOMMAND_MODULES` names them, so workflows (``icl``, ``a3``) own
their CLI code. Bad input exits with status 2 and one line naming the fix.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from kvpress_ext.errors import KVPressExtError

SUBCOMMAND_MODULES = ("kvpress_ext.icl.cli", "kvpress_ext.presses.a3.cli", "kvpress_ext.generate")


def _cmd_list(args) -> int:
    from kvpress_ext.adapters import available_adapters
    from kvpress_ext.plugins import failed_plugins
    from kvpress_ext.registry import available_presses

    presses = available_presses()
    print(f"Presses ({len(presses)}):")
    for name, info in presses.items():
        params = ", ".join(str(p) for p in info.parameters)
        note = f"  [needs: {info.requires}]" if info.requires else ""
        source = "" if info.source in ("kvpress_ext",) else f"  (from {info.source})"
        print(f"  {name:24s} {info.summary}{source}{note}")
        if params:
            print(f"  {'':24s}   params: {params}")
    print(f"\nModel adapters ({len(available_adapters())}):")
    for adapter in available_adapters():
        print(f"  {adapter.describe()}")
    failures = failed_plugins()
    if failures:
        print("\nPlugins that failed to load:")
        for f in failures:
            print(f"  {f.name}: {f.reason}")
    return 0


def _cmd_describe(args) -> int:
    from kvpress_ext.registry import press_info

    info = press_info(args.name)
    print(f"{info.name}  ({info.cls.__module__}.{info.cls.__name__}, from {info.source})\n")
    print(info.doc)
    print("\nParameters:")
    for p in info.parameters:
        print(f"  {p.name}: {p.type}" + ("" if p.required else f" = {p.default!r}"))
    if info.defaults:
        print(f"\nDefaults used when built by name without arguments: {info.defaults}")
    if info.requires:
        print(f"\nNeeds: {info.requires}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvpress-ext", description="KV-cache compression toolkit (kvpress-ext)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list registered presses and model adapters")
    p.set_defaults(func=_cmd_list)
    p = sub.add_parser("describe", help="print one press's documentation and parameters")
    p.add_argument("name")
    p.set_defaults(func=_cmd_describe)
    for module_name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KVPressExtError as exc:
        print(f"kvpress-ext: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
