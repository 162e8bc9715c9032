"""Locks of output paths: an ``flock`` on ``.NAME.lock`` beside the path, safe against a planted file.

Writers of one path serialise here (per cache, per chunk entry, per output file). The lock file is removed on
release and the kernel frees the lock of a killed process, so nothing stale is ever waited on. Because the lock
file sits in a folder other people may write into, it is opened with ``O_NOFOLLOW`` (a symbolic link planted at
``.NAME.lock`` is refused, never followed) and written into only when it is ours: created by this call, or a
regular single-link file holding nothing but a process id (what a killed kvpress-ext leaves behind).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from kvpress_ext.core.errors import KVPressExtError

LOCK_WIDTH = 12  # the pid, left-aligned and space-padded: fixed width, so it is never truncated
_OUR_LOCK = re.compile(rb"\d{1,%d} *" % LOCK_WIDTH)


class OutputPathError(KVPressExtError):
    """An output path that holds something that is not ours (nothing was written)."""


class LockBusy(KVPressExtError):
    """Another process holds the lock of a path (only with ``blocking=False``)."""


_HELD: dict[str, list] = {}  # lock file -> [owning thread id, depth]: re-entrant within one thread
_HELD_GUARD = threading.Lock()
_FLAGS = os.O_RDWR | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def lock_path(path) -> Path:
    path = Path(path)
    return path.parent / f".{path.name}.lock"


def _is_our_lock(fd: int) -> bool:
    """A regular file with one link, empty or holding only a pid (ours, or left by a killed kvpress-ext)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size > LOCK_WIDTH:
        return False
    return st.st_size == 0 or bool(_OUR_LOCK.fullmatch(os.pread(fd, LOCK_WIDTH, 0)))


def _open_lock(lock_file: Path) -> int | None:
    """A descriptor of the lock file, created if missing; None when it vanished meanwhile (try again)."""
    try:
        return os.open(lock_file, _FLAGS | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return _open_lock_existing(lock_file)


def check_lock_file(path) -> None:
    """Raise :class:`OutputPathError` now (before any work) if the lock file of ``path`` exists and is not ours;
    a missing one is fine. Nothing is created or written."""
    lock_file = lock_path(path)
    if not os.path.lexists(lock_file):
        return
    fd = _open_lock_existing(lock_file)
    if fd is not None:
        os.close(fd)


def _open_lock_existing(lock_file: Path) -> int | None:
    try:
        fd = os.open(lock_file, _FLAGS | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutputPathError(f"{lock_file} is a symbolic link where kvpress-ext keeps its lock file; remove "
                                  "it, then rerun (nothing was written)") from None
        raise
    if not _is_our_lock(fd):
        os.close(fd)
        raise OutputPathError(f"{lock_file} exists and is not a kvpress-ext lock file; remove or rename it, then "
                              "rerun (nothing was written)")
    return fd


def _acquire(lock_file: Path, blocking: bool, on_wait: Callable[[str], None] | None) -> int:
    waited = False
    while True:
        fd = _open_lock(lock_file)
        if fd is None:
            continue
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
                cur = os.stat(lock_file, follow_symlinks=False)
            except FileNotFoundError:
                cur = None
            if cur is not None and (cur.st_ino, cur.st_dev) == (st.st_ino, st.st_dev):
                if not _is_our_lock(fd):  # changed under us (a hard link added): never write into it
                    raise OutputPathError(f"{lock_file} is not a kvpress-ext lock file any more; remove it, then "
                                          "rerun (nothing was written)")
                # fixed width, no truncation: ext4 flushes a truncated file on close (7 ms instead of 0.1 ms)
                os.pwrite(fd, b"%-*d" % (LOCK_WIDTH, os.getpid()), 0)
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
