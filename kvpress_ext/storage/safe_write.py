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

import errno
import fcntl
import json
import os
import re
import shutil
import sys
import threading
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from kvpress_ext.core.errors import KVPressExtError

RESULTS_MARKER = ".kvpress-ext-results"


class OutputPathError(KVPressExtError):
    """An output path that holds something that is not ours (nothing was written)."""


class LockBusy(KVPressExtError):
    """Another process holds the lock of a path (only with ``blocking=False``)."""


# --- locks ------------------------------------------------------------------------------------------------------
_HELD: dict[str, list] = {}  # lock file -> [owning thread id, depth]: re-entrant within one thread
_HELD_GUARD = threading.Lock()


def lock_path(path) -> Path:
    path = Path(path)
    return path.parent / f".{path.name}.lock"


def _acquire(lock_file: Path, blocking: bool, on_wait: Callable[[str], None] | None) -> int:
    waited = False
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                if not blocking:
                    raise LockBusy(f"another process (pid {holder}) is writing {lock_file.parent / lock_file.name[1:-5]}; "
                                   "wait for it to finish, then rerun") from None
                if on_wait is not None and not waited:
                    on_wait(holder)
                    waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            # the holder before us may have removed the file: then our lock is on an orphan inode; start over
            st = os.fstat(fd)
            try:
                cur = os.stat(lock_file)
            except FileNotFoundError:
                cur = None
            if cur is not None and (cur.st_ino, cur.st_dev) == (st.st_ino, st.st_dev):
                # fixed width, no truncation: ext4 flushes a truncated file on close (7 ms instead of 0.1 ms)
                os.pwrite(fd, b"%-12d" % os.getpid(), 0)
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


@contextmanager
def path_lock(path, *, blocking: bool = True, on_wait: Callable[[str], None] | None = None):
    """Hold an exclusive ``flock`` on ``.NAME.lock`` next to ``path`` (re-entrant in one thread).

    Another thread or process asking for the same path waits (``on_wait(pid)`` is called once first), or raises
    :class:`LockBusy` with ``blocking=False``. The parent directory is created if needed.
    """
    lock_file = lock_path(path)
    key = os.path.abspath(lock_file)
    me = threading.get_ident()
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None and held[0] == me:
            held[1] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield
        finally:
            with _HELD_GUARD:
                _HELD[key][1] -= 1
        return
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(lock_file, blocking, on_wait)
    with _HELD_GUARD:
        _HELD[key] = [me, 1]
    try:
        yield
    finally:
        with _HELD_GUARD:
            del _HELD[key]
        try:
            os.unlink(lock_file)  # while still locked: a waiter then sees another inode (or none) and retries
        except FileNotFoundError:
            pass
        os.close(fd)


def waiting_note(path) -> Callable[[str], None]:
    """An ``on_wait`` callback printing one line on stderr."""
    return lambda pid: print(f"kvpress-ext: waiting for another process (pid {pid}) writing {path}", file=sys.stderr)


@contextmanager
def try_lock(path):
    """Yield True holding the lock, or False when another process holds it or none can be made (read-only)."""
    if not Path(path).parent.is_dir():
        yield False
        return
    try:
        with path_lock(path, blocking=False):
            yield True
            return
    except LockBusy:
        pass
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise
    yield False


# --- recovery and atomic replacement -------------------------------------------------------------------------------
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|new|old)-[^/]*$")


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


def recover(path) -> list[str]:
    """Finish or undo an interrupted replacement of ``path`` and remove stale temporaries; returns what it did.

    Call it holding :func:`path_lock` (``path``): then no other writer is between its renames. When ``path`` is
    missing, a complete ``.NAME.new-*`` is moved in (the swap is finished), else the newest ``.NAME.old-*`` is
    moved back (restored). Every other ``.NAME.tmp-*`` / ``.new-*`` / ``.old-*`` is removed.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    done = []
    found = _leftovers(path)
    news, olds = found["new"], found["old"]
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


# --- the ownership rule: files ------------------------------------------------------------------------------------
def _is_json(path: Path) -> bool:
    try:
        json.loads(path.read_bytes())
        return True
    except (ValueError, OSError):
        return False


_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"%PDF", b"<?xml", b"<svg", b"\xff\xd8\xff")


def _is_image(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError:
        return False
    return head.startswith(_IMAGE_MAGIC)


def _is_markdown(path: Path) -> bool:
    try:
        head = path.read_bytes()[:2]
    except OSError:
        return False
    return head.startswith(b"# ")


KINDS: dict[str, tuple[str, Callable[[Path], bool]]] = {
    "json": ("a JSON document", _is_json),
    "image": ("an image (PNG, PDF, SVG)", _is_image),
    "markdown": ("a Markdown report starting with '# '", _is_markdown),
}


def check_output_file(path, kind: str = "json", flag: str = "--json",
                      is_ours: Callable[[Path], bool] | None = None, what: str | None = None) -> Path:
    """Raise :class:`OutputPathError` unless ``path`` may be (re)written as an output file of ``kind``.

    Missing (its parent may be created), or a regular file of the same kind (``is_ours`` overrides the kind's
    test, ``what`` its description). Call it before any work, so bad input costs nothing and writes nothing.
    """
    path = Path(path)
    test = is_ours or KINDS[kind][1]
    what = what or KINDS[kind][0]
    if path.is_symlink():
        raise OutputPathError(f"{flag} {path} is a symbolic link; pass the path of a regular file instead")
    if path.exists():
        if path.is_dir():
            raise OutputPathError(f"{flag} {path} is a directory; pass a file path such as {path / ('out.' + kind)}")
        if not path.is_file():
            raise OutputPathError(f"{flag} {path} exists and is not a regular file; pass a new file path")
        if path.stat().st_size and not test(path):  # an empty file holds nothing to lose
            raise OutputPathError(f"{flag} {path} exists and is not {what} kvpress-ext would replace; "
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
    """A results directory from before the marker: only summary.md/.png and JSON objects, nothing else."""
    entries = list(directory.iterdir())
    for e in entries:
        if e.name in ("summary.md", "summary.png") and e.is_file() and not e.is_symlink():
            continue
        if e.suffix == ".json" and e.is_file() and not e.is_symlink() and _is_json(e):
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
    return (path / RESULTS_MARKER).is_file() or _legacy_results(path)


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
    if not marker.exists():
        marker.write_text("This directory holds kvpress-ext results; kvpress-ext may overwrite its files.\n")
    return path
