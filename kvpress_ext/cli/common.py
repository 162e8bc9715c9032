"""Argument parsing shared by the commands: ``KEY=VALUE`` press parameters and positive integers."""

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


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse under the bad-input contract: a parse error is one line on stderr naming the fix, exit status 2
    (argparse's default prints the whole usage block first). Subcommand parsers inherit the class."""

    def error(self, message: str):
        text = " ".join(str(message).split())
        self.exit(2, f"{self.prog}: error: {text} (see `{self.prog} --help`)\n")
