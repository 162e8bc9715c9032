"""The ``kvpress-ext`` command line: ``list``, ``describe NAME``, and subcommands that modules add
(``generate``, ``icl``, ``a3``).

The command-line layer lives in this package, one module per command, over library functions that take plain
arguments (no argparse below this package). A command module exposes ``add_parser(subparsers)`` which registers
its parser with ``set_defaults(func=...)``; :data:`SUBCOMMAND_MODULES` names them. ``perplexity`` is the
parser behind ``evaluation/perplexity.py``. Bad input exits with status 2 and one line naming the fix.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from kvpress_ext.cli.common import OneLineArgumentParser, command_entry, quiet_command_line

SUBCOMMAND_MODULES = (
    "kvpress_ext.cli.catalog",
    "kvpress_ext.cli.generate",
    "kvpress_ext.cli.icl",
    "kvpress_ext.cli.a3",
)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="kvpress-ext", description="KV-cache compression toolkit (kvpress-ext)")
    sub = parser.add_subparsers(dest="command", required=True)
    for module_name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.add_parser(sub)
    return parser


@command_entry("kvpress-ext")
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_command_line()
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
