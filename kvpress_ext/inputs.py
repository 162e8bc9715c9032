"""Reading a user's text file: one line naming the fix for a missing file, a directory, an unreadable file or
bytes that are not UTF-8, instead of a ``UnicodeDecodeError`` traceback (or, worse, silently replaced bytes).

Every command reads its text inputs (prompts, data files, chunk files, haystacks) through :func:`read_text_file`.
"""

from __future__ import annotations

from pathlib import Path

from kvpress_ext.errors import KVPressExtError


class InputFileError(KVPressExtError):
    """A text input that is missing, not a file, unreadable or not UTF-8."""


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
