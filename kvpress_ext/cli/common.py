"""Argument parsing shared by the commands: ``--model``, ``KEY=VALUE`` press parameters, positive integers,
``--threads``, and warnings printed as one line."""

from __future__ import annotations

import argparse
import sys
import warnings

from kvpress_ext.errors import PressParameterError
from kvpress_ext.threads import DEFAULT_THREADS, set_threads  # noqa: F401 - re-exported for the commands


def parse_value(text: str):
    """``true``/``false`` -> bool, ``none``/``null`` -> None, then int, then float, else the string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_press_kwargs(items: list[str] | None, flag: str = "--press_kwargs") -> dict:
    """``["k=v", ...]`` -> ``{k: parse_value(v)}``; a malformed item is a one-line error naming ``flag``."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PressParameterError(f"{flag} expects KEY=VALUE items, got {item!r}.")
        out[key] = parse_value(value)
    return out


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse under the bad-input contract: a parse error is one line on stderr naming the fix, exit status 2
    (argparse's default prints the whole usage block first). Subcommand parsers inherit the class."""

    def error(self, message: str):
        text = " ".join(str(message).split())
        self.exit(2, f"{self.prog}: error: {text} (see `{self.prog} --help`)\n")


def add_threads_argument(parser: argparse.ArgumentParser, *aliases: str) -> None:
    """``--threads N`` (and any old spellings in ``aliases``, hidden from --help)."""
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help=f"torch CPU threads (default {DEFAULT_THREADS}: fastest on a busy machine; more can help "
                             "bigger models on an idle one)")
    for alias in aliases:
        parser.add_argument(alias, dest="threads", type=positive_int, default=None, help=argparse.SUPPRESS)


def quiet_command_line(prog: str = "kvpress-ext") -> None:
    """What every command does first: warnings as one line each, kvpress's repeated log lines once each, and no
    per-tensor "Loading weights" progress bars from transformers (whichever code path loads a model)."""
    from transformers.utils import logging as hf_logging

    from kvpress_ext.apply import quiet_repeated_kvpress_logs

    hf_logging.disable_progress_bar()
    print_warnings_on_one_line(prog)
    quiet_repeated_kvpress_logs()  # kvpress logs some messages per layer and per forward: show each once


def print_warnings_on_one_line(prog: str = "kvpress-ext") -> None:
    """Show warnings as ``prog: warning: message`` on stderr (no file name, line number or source line)."""

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {message}", file=file or sys.stderr)

    warnings.showwarning = show
MODEL_HELP = ("model: a short name (smollm2-135m, stories260k, or one a plugin adds; `kvpress-ext list` shows them), "
              "a local model directory or a hub id")


def add_model_argument(parser, *, chat_template: bool = True) -> None:
    """``--model`` (default: :data:`kvpress_ext.models.DEFAULT_MODEL`) and, for commands that build prompts,
    ``--no_chat_template``."""
    from kvpress_ext.models import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"{MODEL_HELP} (default: %(default)s)")
    if chat_template:
        parser.add_argument("--no_chat_template", dest="use_chat_template", action="store_false",
                            help="feed raw text even if the model has a chat template (default: the template's "
                                 "user turn = context, blank line, question, then the assistant header)")
