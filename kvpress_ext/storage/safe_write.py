"""Writing without losing anything: locks, atomic replacement, crash recovery, and whose path it is.

The rule every writer follows (``icl precompute --out``, ``a3`` stores, ``--output_dir``, ``--json``, ...):

* **Directories.** A cache, a chunk store or a results directory is written only into a path that is missing,
  an empty directory, or a directory our own metadata or marker file says is ours. Anything else (a file, a
  user's directory) is refused with one line and exit 2, and left untouched. ``--recompute`` /
  ``--recompute_bad`` replace a directory only when it is one of our caches.
* **Files.** An output file (``--json``, ``--out`` of ``icl eval``, ``--csv``, plots) is written to a temporary
  sibling and renamed into place, so nobody ever sees half a file. An existing path is replaced only when it is
  a regular file of the same kind (a JSON document for JSON output, a PNG for a PNG plot, our CSV header for
  a CSV...): ``--json notes.txt`` over a text file, a directory or a symbolic link is refused.

A directory is replaced in three renames: the finished ``.NAME.tmp-*`` becomes ``.NAME.new-*`` (complete), the
old directory moves to ``.NAME.old-*``, the new one moves to ``NAME``. :func:`recover`, run under the lock by the
next writer or reader, finishes a swap a crash interrupted (or restores the old directory when no complete new
one exists) and removes stale temporaries. Writers of one path serialise on an ``flock`` of ``.NAME.lock`` next
to it (per cache, per chunk entry); the lock file is removed on release and the kernel frees the lock of a
killed process, so nothing stale is ever waited on.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from kvpress_ext.storage.inputs import load_json
from kvpress_ext.storage.locks import (  # noqa: F401 - the writing layer's one import for writers
    LockBusy,
    OutputPathError,
    check_lock_file,
    lock_path,
    path_lock,
    try_lock,
    waiting_note,
)

RESULTS_MARKER = ".kvpress-ext-results"


# --- recovery and atomic replacement -------------------------------------------------------------------------------
# exactly the tags temporary_sibling makes (pid, 8 hex digits): a user's ``.report.json.old-keep`` is no leftover
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|new|old)-(?P<tag>[0-9]+-[0-9a-f]{8})$")


def _leftovers(path: Path) -> dict[str, list[Path]]:
    """``.NAME.tmp-*`` / ``.new-*`` / ``.old-*`` next to ``path``, oldest first (one directory scan)."""
    found: dict[str, list[Path]] = {"tmp": [], "new": [], "old": []}
    prefix = f".{path.name}."
    with os.scandir(path.parent) as entries:
        for e in entries:
            if e.name.startswith(prefix):
                m = _LEFTOVER.match(e.name)
                if m and m["name"] == path.name:
                    found[m["kind"]].append(Path(e.path))
    for paths in found.values():
        paths.sort(key=lambda p: p.lstat().st_mtime_ns)
    return found


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def recover(path, is_ours: Callable[[Path], bool] | None = None) -> list[str]:
    """Finish or undo an interrupted replacement of ``path`` and remove stale temporaries; returns what it did.

    Call it holding :func:`path_lock` (``path``): then no other writer is between its renames. When ``path`` is
    missing, a complete ``.NAME.new-*`` is moved in (the swap is finished), else the newest ``.NAME.old-*`` is
    moved back (restored). Every other ``.NAME.tmp-*`` / ``.new-*`` / ``.old-*`` is removed. Only names with our
    exact tag count, and a ``.new-*`` / ``.old-*`` is adopted or removed only when :func:`is_ours` (or the
    writer's own ``is_ours``) says so (something else that merely looks like a leftover is left alone).
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    done = []
    found = _leftovers(path)
    ours = is_ours or _is_ours
    news, olds = [p for p in found["new"] if ours(p)], [p for p in found["old"] if ours(p)]
    if not os.path.lexists(path):
        if news:
            os.rename(news.pop(), path)
            done.append("finished an interrupted replacement")
        elif olds:
            os.rename(olds.pop(), path)
            done.append("restored the previous version after an interrupted replacement")
    for p in found["tmp"] + news + olds:
        _remove(p)
        done.append(f"removed {p.name}")
    return done


def sweep(directory) -> list[str]:
    """:func:`recover` every path of ``directory`` that has leftovers and no writer (one scan; stores call it once)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    names = set()
    with os.scandir(directory) as entries:
        for e in entries:
            m = _LEFTOVER.match(e.name)
            if m:
                names.add(m["name"])
    done = []
    for name in sorted(names):
        with try_lock(directory / name) as locked:
            if locked:
                done += recover(directory / name)
    return done


def temporary_sibling(path, directory: bool) -> Path:
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if directory:
        tmp.mkdir()
    return tmp


def replace_directory(path, write_fn: Callable[[Path], None]) -> Path:
    """Call ``write_fn(tmp_dir)``, then put ``tmp_dir`` at ``path``, replacing what is there (see module docstring).

    The caller checks that ``path`` is ours and holds :func:`path_lock`; a crash at any point leaves either the
    old or the new directory at ``path`` (after :func:`recover`), never a mix and never nothing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path, directory=True)
    try:
        write_fn(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tag = tmp.name.rsplit(".tmp-", 1)[1]
    new = path.parent / f".{path.name}.new-{tag}"
    os.rename(tmp, new)
    if os.path.lexists(path):
        try:
            os.rmdir(path)  # an empty directory: nothing to keep
        except OSError:
            old = path.parent / f".{path.name}.old-{tag}"
            os.rename(path, old)
            os.rename(new, path)
            shutil.rmtree(old, ignore_errors=True)
            return path
    os.rename(new, path)
    return path


def _fsync_tree(directory: Path) -> None:
    for p in directory.iterdir():
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to a temporary sibling, then rename it to ``path`` (no ownership check: see write_output)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path, directory=False)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    return path


def json_safe(x):
    """A copy of ``x`` that ``json.dumps`` writes as standard JSON: non-finite floats become null (not ``NaN``),
    tuples lists, keys strings, and other objects their ``repr``."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return repr(x)


# --- the ownership rule: one test of what is ours --------------------------------------------------------------
#: Every JSON document write_output writes carries this key and value: the proof that kvpress-ext may replace it.
OWNER_KEY, OWNER = "written_by", "kvpress-ext"
MARKDOWN_MARK = "<!-- written by kvpress-ext -->"
_OUR_KINDS = ("kvpress_ext.",)  # the "kind" of our caches' / chunk entries' metadata.json and of store.json


def _json_file(path: Path, limit: int = 64 << 20):
    """The parsed JSON of a regular file up to ``limit`` bytes, or None (unreadable, too big, not JSON)."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > limit:
            return None
        return load_json(path.read_bytes())
    except (OSError, ValueError):  # JSONDecodeError, UnicodeDecodeError, JSONInputError
        return None


def _safetensors_ours(path: Path) -> bool:
    """A tensor file whose header metadata names our format version (what save_cache writes)."""
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n <= 64 << 20:
                return False
            header = load_json(fh.read(n))
    except (OSError, ValueError):
        return False
    return isinstance(header, dict) and isinstance(header.get("__metadata__"), dict) and \
        "format_version" in header["__metadata__"]


def is_ours(path) -> bool:
    """The one ownership test: may kvpress-ext replace what is at ``path``?

    Only when its own contents prove it: a directory holding :data:`RESULTS_MARKER`, or a ``metadata.json`` /
    ``store.json`` whose ``kind`` is one of ours, or nothing but a cache's two files with our tensor header (a
    cache whose metadata was damaged); a JSON file carrying ``"written_by": "kvpress-ext"``; a Markdown file
    ending with :data:`MARKDOWN_MARK`; an image matplotlib made. A symbolic link is never ours.
    """
    path = Path(path)
    if path.is_symlink():
        return False
    if path.is_dir():
        if (path / RESULTS_MARKER).is_file():
            return True
        for name in ("metadata.json", "store.json"):
            meta = _json_file(path / name)
            if isinstance(meta, dict) and str(meta.get("kind", "")).startswith(_OUR_KINDS):
                return True
        names = {p.name for p in path.iterdir()}
        return names <= {"metadata.json", "tensors.safetensors"} and _safetensors_ours(path / "tensors.safetensors")
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
            fh.seek(max(0, path.stat().st_size - (1 << 16)))
            tail = fh.read()
    except OSError:
        return False
    if head.startswith(_IMAGE_MAGIC):
        return b"atplotlib" in head or b"atplotlib" in tail
    if tail.rstrip().endswith(MARKDOWN_MARK.encode()):
        return True
    doc = _json_file(path)
    return isinstance(doc, dict) and doc.get(OWNER_KEY) == OWNER


_is_ours = is_ours  # for functions whose ``is_ours`` argument overrides the test
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"%PDF", b"<?xml", b"<svg", b"\xff\xd8\xff")

KINDS: dict[str, str] = {
    "json": f"a JSON output of kvpress-ext (one holds \"{OWNER_KEY}\": \"{OWNER}\")",
    "image": "a plot kvpress-ext made (PNG, PDF, SVG)",
    "markdown": "a Markdown report kvpress-ext wrote",
}


def stamp(data: str, kind: str) -> str:
    """``data`` with our ownership mark: the first key of a JSON object, the last line of Markdown."""
    if kind == "json":
        m = re.match(r"\s*\{(\s*)", data)
        if m is None:
            raise TypeError("kvpress-ext writes JSON outputs as objects (they carry its ownership mark)")
        body = data[m.end():]
        sep = "" if body.startswith("}") else "," + (m.group(1) or " ")
        return data[:m.start(1)] + m.group(1) + f'"{OWNER_KEY}": "{OWNER}"' + sep + body
    if kind == "markdown" and MARKDOWN_MARK not in data:
        return data.rstrip("\n") + "\n\n" + MARKDOWN_MARK + "\n"
    return data


def check_output_file(path, kind: str = "json", flag: str = "--json",
                      is_ours: Callable[[Path], bool] | None = None, what: str | None = None) -> Path:
    """Raise :class:`OutputPathError` unless ``path`` may be (re)written as an output file of ``kind``.

    Missing (its parent may be created), or a regular file of the same kind (``is_ours`` overrides the kind's
    test, ``what`` its description). Call it before any work, so bad input costs nothing and writes nothing.
    """
    path = Path(path)
    test = is_ours or _is_ours
    what = what or KINDS[kind]
    if path.is_symlink():
        raise OutputPathError(f"{flag} {path} is a symbolic link; pass the path of a regular file instead")
    check_lock_file(path)
    if path.exists():
        if path.is_dir():
            raise OutputPathError(f"{flag} {path} is a directory; pass a file path such as {path / ('out.' + kind)}")
        if not path.is_file():
            raise OutputPathError(f"{flag} {path} exists and is not a regular file; pass a new file path")
        if path.stat().st_size and not test(path):  # an empty file holds nothing to lose
            raise OutputPathError(f"{flag} {path} exists and is not {what}, so kvpress-ext will not replace it; "
                                  "pass a new file path or remove it yourself (nothing was written)")
    else:
        parent = first_existing(path.parent)
        if parent is not None and not parent.is_dir():
            raise OutputPathError(f"{flag} {path}: {parent} is not a directory; pass a path inside a directory")
    return path


def first_existing(p: Path) -> Path | None:
    for q in (p, *p.parents):
        if os.path.lexists(q):
            return q
    return None


def write_output(path, data: str | bytes, kind: str = "json", flag: str = "--json",
                 is_ours: Callable[[Path], bool] | None = None, what: str | None = None) -> Path:
    """Check ``path`` (:func:`check_output_file`), then write ``data`` atomically under the path's lock.

    Missing parent directories are created (``--json runs/today/out.json`` works).
    """
    path = check_output_file(path, kind, flag, is_ours, what)
    if isinstance(data, str) and is_ours is None:
        data = stamp(data, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path_lock(path):
        recover(path)
        check_output_file(path, kind, flag, is_ours, what)  # again, under the lock
        return atomic_write_bytes(path, data.encode() if isinstance(data, str) else data)


def save_figure(fig, path, flag: str = "--plot", **kwargs) -> Path:
    """``fig.savefig`` under the output-file rule (an existing path must be an image), written atomically."""
    import io

    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=(path.suffix.lstrip(".") or "png"), **kwargs)
    return write_output(path, buf.getvalue(), kind="image", flag=flag)


# --- the ownership rule: results directories -------------------------------------------------------------------
def _legacy_results(directory: Path) -> bool:
    """A results directory from before the marker: a summary.md, and only summary.png and JSON objects beside it."""
    entries = list(directory.iterdir())
    if not (directory / "summary.md").is_file():
        return False
    for e in entries:
        if e.name in ("summary.md", "summary.png") and e.is_file() and not e.is_symlink():
            continue
        if e.suffix == ".json" and isinstance(_json_file(e), dict):
            continue
        if e.name.startswith(".") and e.name.endswith(".lock"):
            continue
        return False
    return True


def check_target_dir(path, *, flag: str, ours: Callable[[Path], bool], what: str,
                     refuse_symlinks: bool = False, symlink_fix: str = "pass a directory",
                     file_error: str | None = None, foreign_error: str | None = None) -> Path:
    """Raise :class:`OutputPathError` unless kvpress-ext may write into directory ``path``; return it as a Path.

    The one directory rule of the module docstring, shared by results directories, saved caches and chunk stores:
    a missing path (whose first existing parent is a directory), an empty directory, or one that ``ours(path)``
    recognises is accepted; an existing non-directory or somebody else's directory is refused with one line
    ``"{flag} {path} ..."`` naming the fix. Nothing is written. ``what`` names our kind of directory in the default
    messages; ``file_error`` / ``foreign_error`` replace the text after ``"{flag} {path} "`` where a caller words
    it differently. A symbolic link is followed to a directory (refused only when broken or not to a directory:
    ``"is a broken symbolic link; {symlink_fix}"``), or always refused with ``refuse_symlinks``
    (``"is a symbolic link; {symlink_fix}"``). ``ours`` is asked before the directory is listed for emptiness,
    so a marker file alone decides even where the directory cannot be listed.
    """
    path = Path(path)
    check_lock_file(path)
    if refuse_symlinks and path.is_symlink():
        raise OutputPathError(f"{flag} {path} is a symbolic link; {symlink_fix}")
    if path.is_symlink() and not path.is_dir():
        raise OutputPathError(f"{flag} {path} is a broken symbolic link; {symlink_fix}")
    if not path.exists():
        parent = first_existing(path.parent)
        if parent is not None and not parent.is_dir():
            raise OutputPathError(f"{flag} {path}: {parent} is not a directory; pass a path inside a directory")
        return path
    if not path.is_dir():
        raise OutputPathError(f"{flag} {path} " + (file_error or f"is a file, not {what}; pass a new or empty directory"))
    if ours(path) or not any(path.iterdir()):
        return path
    raise OutputPathError(f"{flag} {path} " + (foreign_error or f"is a directory that is not {what}; pass a new or "
                                                                "empty directory (nothing was written)"))


def _is_results_dir(path: Path) -> bool:
    marker = path / RESULTS_MARKER
    return (marker.is_file() and not marker.is_symlink()) or _legacy_results(path)


def check_output_dir(path, flag: str = "--output_dir") -> Path:
    """Raise :class:`OutputPathError` unless ``path`` may hold our results (see :func:`claim_output_dir`)."""
    path = Path(path)
    return check_target_dir(
        path, flag=flag, ours=_is_results_dir, what="a directory",
        foreign_error=f"is a directory kvpress-ext did not create (it has other files and no {RESULTS_MARKER}); "
                      f"pass a new or empty directory, or `touch {path / RESULTS_MARKER}` to let kvpress-ext write "
                      "into it",
    )


def claim_output_dir(path, flag: str = "--output_dir") -> Path:
    """Check ``path`` and mark it ours: missing (created), empty, marked, or an old results directory."""
    path = check_output_dir(path, flag)
    path.mkdir(parents=True, exist_ok=True)
    marker = path / RESULTS_MARKER
    if not os.path.lexists(marker):
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w") as fh:
            fh.write("This directory holds kvpress-ext results; kvpress-ext may overwrite its files.\n")
    return path


def own_subdir(parent, name: str, flag: str = "--output_dir") -> Path:
    """``parent/name``, created if missing, for our files inside a directory of ours: refused (one line) when it
    is a symbolic link or not a directory, so nothing is ever written through a link planted there."""
    sub = check_own_subdir(parent, name, flag)
    sub.mkdir(exist_ok=True)
    return sub


def check_own_subdir(parent, name: str, flag: str = "--output_dir") -> Path:
    """:func:`own_subdir`'s check alone (nothing is created): call it before any work."""
    sub = Path(parent) / name
    if sub.is_symlink() or (os.path.lexists(sub) and not sub.is_dir()):
        raise OutputPathError(f"{flag} {parent}: {name} is a symbolic link or not a directory; remove it (kvpress-ext "
                              "writes only into folders it made), then rerun (nothing was written)")
    return sub
