"""Reading a user's text file: one line naming the fix for a missing file, a directory, an unreadable file or
bytes that are not UTF-8, instead of a ``UnicodeDecodeError`` traceback (or, worse, silently replaced bytes).

Every command reads its text inputs (prompts, data files, chunk files, haystacks) through :func:`read_text_file`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kvpress_ext.core.errors import KVPressExtError


class InputFileError(KVPressExtError):
    """A text input that is missing, not a file, unreadable or not UTF-8."""


#: The environment variable naming the shared data folder (``models/``, ``data/``).
SHARED_ENV = "KVPRESS_EXT_SHARED"


def shared_dir() -> Path:
    """The shared data folder: ``$KVPRESS_EXT_SHARED``, else ``shared/`` beside a source checkout.

    An installed package has no checkout to look beside, so it needs the variable (one line says so)."""
    if os.environ.get(SHARED_ENV):
        return Path(os.environ[SHARED_ENV])
    checkout = Path(__file__).resolve().parents[2]
    if not (checkout / "pyproject.toml").is_file():
        raise InputFileError(f"the shared data folder is unknown: set {SHARED_ENV} to the folder that holds models/ "
                             "and data/ (a source checkout finds ../shared by itself).")
    return checkout.parent / "shared"


def read_text_file(path, flag: str, what: str = "a UTF-8 text file") -> str:
    """The text of ``path`` (UTF-8; a leading byte-order mark is dropped). ``flag`` names the option in messages."""
    path = Path(path)
    if path.is_dir():
        raise InputFileError(f"{flag} {str(path)!r} is a directory; pass {what}.")
    if not path.is_file():
        raise InputFileError(f"{flag} {str(path)!r} does not exist; pass {what}.")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputFileError(f"{flag} {str(path)!r} cannot be read ({exc.strerror or exc}); pass {what}.") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputFileError(
            f"{flag} {str(path)!r} is not valid UTF-8 (byte 0x{data[exc.start]:02x} on line {line}, offset "
            f"{exc.start}): re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path} > fixed.txt`."
        ) from None


def parse_json_or_jsonl(text: str) -> list:
    """The items of a JSON list, or of JSON Lines (one value per non-empty line); json.JSONDecodeError if neither."""
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]
