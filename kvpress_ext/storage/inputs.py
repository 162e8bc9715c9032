"""Reading a user's file: one line naming the fix for a missing file, a directory, a device, a file too big,
an unreadable file or bytes that are not UTF-8, instead of a traceback (or, worse, silently replaced bytes).

Every command reads its text inputs (prompts, data files, chunk files, haystacks) through :func:`read_text_file`,
and every JSON it did not just write itself (data files, chunk files, clusters, device maps, cache metadata, cell
files) through :func:`load_json`, which bounds nesting depth, size and digits: a file that is hostile or broken
costs one line, never a ``RecursionError`` or minutes of work.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from kvpress_ext.core.errors import KVPressExtError


class InputFileError(KVPressExtError):
    """A text input that is missing, not a file, unreadable or not UTF-8."""


class JSONInputError(InputFileError):
    """JSON nested too deeply, too large or with a number too long to be data (raised by :func:`load_json`)."""


#: Limits of :func:`load_json` and :func:`read_text_file`: far above any file kvpress-ext writes or reads.
MAX_JSON_DEPTH = 100
MAX_JSON_NUMBER_DIGITS = 40
MAX_TEXT_BYTES = 4 << 30


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
        if os.path.lexists(path):
            raise InputFileError(f"{flag} {str(path)!r} is not a regular file (a device, a pipe or a broken link); "
                                 f"pass {what}.")
        raise InputFileError(f"{flag} {str(path)!r} does not exist; pass {what}.")
    try:
        size = path.stat().st_size
        if size > MAX_TEXT_BYTES:
            raise InputFileError(f"{flag} {str(path)!r} holds {size / 2**30:.1f} GiB, more than the "
                                 f"{MAX_TEXT_BYTES >> 30} GiB kvpress-ext reads; pass a smaller file.")
        data = path.read_bytes()
    except OSError as exc:
        raise InputFileError(f"{flag} {str(path)!r} cannot be read ({exc.strerror or exc}); pass {what}.") from None
    except MemoryError:
        raise InputFileError(f"{flag} {str(path)!r} does not fit in memory; pass a smaller file.") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputFileError(
            f"{flag} {str(path)!r} is not valid UTF-8 (byte 0x{data[exc.start]:02x} on line {line}, offset "
            f"{exc.start}): re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path} > fixed.txt`."
        ) from None


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_JSON_NUMBER_DIGITS:
        raise JSONInputError(f"holds an integer of {len(text.lstrip('-'))} digits (at most "
                             f"{MAX_JSON_NUMBER_DIGITS} are data)")
    return int(text)


def _bounded_float(text: str) -> float:
    if len(text) > 4 * MAX_JSON_NUMBER_DIGITS:
        raise JSONInputError(f"holds a number of {len(text)} characters (at most {4 * MAX_JSON_NUMBER_DIGITS})")
    return float(text)


def _check_depth(value, max_depth: int) -> None:
    """Iteratively (no recursion to exhaust): containers nested at most ``max_depth`` deep."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > max_depth:
                raise JSONInputError(f"nests lists/objects more than {max_depth} deep")
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))


def load_json(data: str | bytes, where: str = "", *, max_depth: int = MAX_JSON_DEPTH):
    """``json.loads`` within bounds: nesting at most ``max_depth`` deep, integers of at most 40 digits.

    A breach raises :class:`JSONInputError` (``"{where} nests ..."``, one line); malformed JSON still raises
    ``json.JSONDecodeError`` so callers keep their own "is not valid JSON" wording.
    """
    reason = None
    try:
        value = json.loads(data, parse_int=_bounded_int, parse_float=_bounded_float)
        _check_depth(value, max_depth)
    except JSONInputError as exc:
        reason = str(exc)
    except RecursionError:
        reason = f"nests lists/objects more than {max_depth} deep"
    if reason is not None:
        error = JSONInputError(f"{where + ' ' if where else 'the JSON '}{reason}; pass a file that kvpress-ext or "
                               "your data tool wrote.")
        error.reason = reason
        raise error
    return value


def parse_json_or_jsonl(text: str, where: str = "") -> list:
    """The items of a JSON list, or of JSON Lines (one value per non-empty line); json.JSONDecodeError if neither,
    :class:`JSONInputError` beyond :func:`load_json`'s bounds."""
    if text.lstrip().startswith("["):
        return load_json(text, where)
    return [load_json(line, where) for line in text.splitlines() if line.strip()]


def read_json_file(path, flag: str, what: str, *, jsonl: bool = False, error: type = InputFileError):
    """The parsed JSON (``jsonl``: also JSON Lines, as a list) of the file ``flag`` names, read with
    :func:`read_text_file`; malformed JSON is one ``error`` naming the flag, the file, the place and ``what`` to
    pass instead."""
    text = read_text_file(path, flag, what)
    try:
        return parse_json_or_jsonl(text, f"{flag} {path}") if jsonl else load_json(text, f"{flag} {path}")
    except json.JSONDecodeError as exc:
        raise error(f"{flag} {str(path)!r} is not valid JSON{'/JSONL' if jsonl else ''} ({exc.msg} at line "
                    f"{exc.lineno}); pass {what}.") from None


_DIGESTS: dict[tuple, str] = {}
_WHOLE_FILE = 64 << 20  # bigger files (weights) are identified by size and their first and last MiB


def _file_digest(h, path: Path, size: int) -> None:
    with open(path, "rb") as fh:
        if size <= _WHOLE_FILE:
            while block := fh.read(1 << 20):
                h.update(block)
        else:
            h.update(fh.read(1 << 20))
            fh.seek(size - (1 << 20))
            h.update(fh.read())


def path_digest(path) -> str:
    """16 hex digits naming what is at ``path``: a file's bytes, or a folder's file names, sizes and bytes (files
    over 64 MiB by their first and last MiB); a name that is no path (a hub id) by the name. Computed once per
    process per (path, size, mtime): what tells a finished sweep cell that its text or its model changed."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return hashlib.sha256(f"name:{path}".encode()).hexdigest()[:16]
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        if path.is_dir():
            for p in sorted(q for q in path.rglob("*") if q.is_file() and not q.name.startswith(".")):
                size = p.stat().st_size
                h.update(f"|{p.relative_to(path)}|{size}|".encode())
                _file_digest(h, p, size)
        else:
            _file_digest(h, path, st.st_size)
        _DIGESTS[key] = h.hexdigest()[:16]
    return _DIGESTS[key]
