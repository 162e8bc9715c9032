"""Argument parsing shared by the commands: ``--model``, ``KEY=VALUE`` press parameters, positive integers."""

from __future__ import annotations

import argparse

from kvpress_ext.errors import PressParameterError


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
