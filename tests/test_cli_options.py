"""Every command-line option, in every command: has help text, is spelled with underscores, and commands that
run a model take ``--threads``. The parsers are collected by running each entry point with ``parse_args``
replaced by a probe, so a parser built inside ``main()`` is checked too."""

from __future__ import annotations

import argparse
import runpy
from pathlib import Path

import pytest

from kvpress_ext import cli
from kvpress_ext.cli import perplexity as perplexity_cli

REPO = Path(__file__).resolve().parents[1]
#: Scripts whose options are checked (every evaluation script with options, the quickstart, the threads benchmark).
SCRIPTS = sorted(p for p in (REPO / "evaluation").glob("*.py") if "__main__" in p.read_text())  # thin: parsers in cli/
SCRIPTS += [REPO / "examples" / "quickstart.py", REPO / "benchmarks" / "threads.py"]


class _Parsed(Exception):
    pass


def _script_parser(path: Path, monkeypatch) -> argparse.ArgumentParser:
    seen = []

    def probe(self, args=None, namespace=None):
        seen.append(self)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", probe)
    monkeypatch.setattr("sys.argv", [str(path)])
    with pytest.raises(_Parsed):
        runpy.run_path(str(path), run_name="__main__")
    monkeypatch.undo()
    return seen[0]


def walk(parser: argparse.ArgumentParser, name: str):
    """(command name, parser) for ``parser`` and every subcommand below it."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from walk(sub, f"{name} {sub_name}")


def all_parsers(monkeypatch):
    out = list(walk(cli.build_parser(), "kvpress-ext"))
    out += list(walk(perplexity_cli.build_parser(), "evaluation/perplexity.py"))
    for path in SCRIPTS:
        if path.name != "perplexity.py":
            out += list(walk(_script_parser(path, monkeypatch), str(path.relative_to(REPO))))
    return out


def _options(parser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def test_every_option_has_help_and_underscores(monkeypatch):
    parsers = all_parsers(monkeypatch)
    assert len(parsers) >= 20  # every kvpress-ext subcommand and every script was reached
    missing, dashed = [], []
    for name, parser in parsers:
        for action in _options(parser):
            if action.help is None or (action.help != argparse.SUPPRESS and not action.help.strip()):
                missing.append(f"{name} {action.option_strings[0]}")
            shown = action.option_strings[0]  # the spelling --help shows first; later ones are hidden aliases
            if action.help != argparse.SUPPRESS and "-" in shown.lstrip("-"):
                dashed.append(f"{name} {shown}")
        for action in parser._actions:
            if isinstance(action, argparse._StoreAction) and not action.option_strings and not action.help:
                missing.append(f"{name} {action.dest} (positional)")
    assert not missing, f"options without help: {missing}"
    assert not dashed, f"options spelled with dashes (use underscores): {dashed}"


def test_commands_that_run_a_model_take_threads(monkeypatch):
    without = [name for name, parser in all_parsers(monkeypatch)
               if any(a.dest in ("model", "embedder") for a in _options(parser))
               and not any("--threads" in a.option_strings for a in _options(parser))]
    assert not without, f"commands without --threads: {without}"


def test_old_spellings_still_parse():
    from kvpress_ext.cli.generate import add_parser

    args = perplexity_cli.build_parser().parse_args(["--num_threads", "3"])
    assert args.threads == 3
    sub = argparse.ArgumentParser().add_subparsers()
    add_parser(sub)
    generate = sub.choices["generate"]
    assert generate.parse_args(["--model", "m", "--prompt", "p", "--num_threads", "2"]).threads == 2
    assert "--num_threads" not in generate.format_help()  # hidden alias


def test_threads_are_applied_and_default_to_one():
    import torch

    from kvpress_ext.runtime.threads import DEFAULT_THREADS, set_threads

    before = torch.get_num_threads()
    try:
        assert set_threads(None) == DEFAULT_THREADS == 1
        assert set_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_help_states_each_default_once(monkeypatch):
    """No "(default: X) (default: None)": a default is stated once, never as None; every option of our commands
    that takes a value and has a default says what it is (the icl subcommands included)."""
    twice, unstated = [], []
    for name, parser in all_parsers(monkeypatch):
        formatter = parser._get_formatter()
        ours = name.startswith(("kvpress-ext", "evaluation/perplexity.py"))
        for action in _options(parser):
            if action.help == argparse.SUPPRESS:
                continue
            shown = " ".join(formatter._expand_help(action).split())
            if shown.count("(default") > 1 or "default: None" in shown or "default: []" in shown:
                twice.append(f"{name} {action.option_strings[0]}: {shown}")
            if (ours and action.nargs != 0 and action.default not in (None, "", []) and "default" not in shown.lower()):
                unstated.append(f"{name} {action.option_strings[0]}")
    assert not twice, twice
    assert not unstated, f"options whose --help does not give the default: {unstated}"
    icl = next(parser for name, parser in all_parsers(monkeypatch) if name == "kvpress-ext icl precompute")
    assert "(default: " in icl.format_help()
