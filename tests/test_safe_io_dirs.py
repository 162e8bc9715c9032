"""The shared directory rule (:func:`kvpress_ext.storage.safe_write.check_target_dir`) on its own, with a toy notion of "ours".

Each case states what is expected: missing or empty is accepted, ours (here: holds ``.ours``) is accepted, a
foreign directory, a file and a broken link are refused with one line naming the flag, the path and the fix, and
the check never writes anything. The three real callers (results directories, caches, chunk stores) keep their
own wording; their exact messages are pinned in test_data_safety.py, test_cache_files_checks.py and
test_a3_chunk_store.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvpress_ext.storage.safe_write import OutputPathError, check_target_dir


def _ours(p: Path) -> bool:
    return (p / ".ours").is_file()


def check(path, **kw):
    return check_target_dir(path, flag="--dir", ours=_ours, what="a toy directory", **kw)


def _snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / ".ours").write_text("")
    (tmp_path / "ours" / "result.txt").write_text("old")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "thesis.tex").write_text("precious")
    (tmp_path / "file").write_text("precious")
    os.symlink(tmp_path / "nowhere", tmp_path / "broken")
    os.symlink(tmp_path / "empty", tmp_path / "link_to_empty")
    return tmp_path


def test_missing_path_is_accepted_and_not_created(tree):
    before = _snapshot(tree)
    # expected: a missing path (and a missing path under missing parents) comes back as a Path, nothing is made
    assert check(str(tree / "new")) == tree / "new"
    assert check(tree / "a" / "b") == tree / "a" / "b"
    assert _snapshot(tree) == before


def test_missing_path_under_a_file_is_refused(tree):
    # expected: the first existing parent is a file, so the directory could never be made
    with pytest.raises(OutputPathError) as err:
        check(tree / "file" / "sub")
    assert str(err.value) == (f"--dir {tree / 'file' / 'sub'}: {tree / 'file'} is not a directory; "
                              "pass a path inside a directory")


def test_empty_directory_is_accepted(tree):
    # expected: an empty directory holds nothing to lose, even though `ours` does not recognise it
    assert not _ours(tree / "empty")
    assert check(tree / "empty") == tree / "empty"


def test_our_directory_is_accepted_untouched(tree):
    before = _snapshot(tree)
    # expected: a non-empty directory that `ours` recognises is accepted, and the check leaves its files alone
    assert check(tree / "ours") == tree / "ours"
    assert _snapshot(tree) == before and (tree / "ours" / "result.txt").read_text() == "old"


def test_foreign_directory_is_refused(tree):
    before = _snapshot(tree)
    # expected: a non-empty directory `ours` does not recognise is refused with the default one-line message
    with pytest.raises(OutputPathError) as err:
        check(tree / "foreign")
    assert str(err.value) == (f"--dir {tree / 'foreign'} is a directory that is not a toy directory; "
                              "pass a new or empty directory (nothing was written)")
    # expected: a caller's own wording replaces everything after "FLAG PATH "
    with pytest.raises(OutputPathError) as err:
        check(tree / "foreign", foreign_error="is somebody else's; pick another")
    assert str(err.value) == f"--dir {tree / 'foreign'} is somebody else's; pick another"
    assert _snapshot(tree) == before and (tree / "foreign" / "thesis.tex").read_text() == "precious"


def test_file_is_refused(tree):
    # expected: an existing file is never a directory to write into, whatever `ours` says
    with pytest.raises(OutputPathError) as err:
        check_target_dir(tree / "file", flag="--dir", ours=lambda p: True, what="a toy directory")
    assert str(err.value) == f"--dir {tree / 'file'} is a file, not a toy directory; pass a new or empty directory"
    with pytest.raises(OutputPathError) as err:
        check(tree / "file", file_error="is a file; pass a directory")
    assert str(err.value) == f"--dir {tree / 'file'} is a file; pass a directory"
    assert (tree / "file").read_text() == "precious"


def test_symbolic_links(tree):
    # expected: a broken link is refused with the caller's fix; a link to a directory is followed ...
    with pytest.raises(OutputPathError) as err:
        check(tree / "broken", symlink_fix="pass a directory for the toy")
    assert str(err.value) == f"--dir {tree / 'broken'} is a broken symbolic link; pass a directory for the toy"
    assert check(tree / "link_to_empty") == tree / "link_to_empty"
    # ... unless the caller refuses every link (a saved cache is replaced by renames, never through a link)
    with pytest.raises(OutputPathError) as err:
        check(tree / "link_to_empty", refuse_symlinks=True, symlink_fix="pass a new directory path")
    assert str(err.value) == f"--dir {tree / 'link_to_empty'} is a symbolic link; pass a new directory path"


def test_ours_decides_only_for_non_empty_directories(tree):
    calls = []

    def ours(p):
        calls.append(p)
        return False

    # expected: `ours` is never asked about missing paths or files, and saying no to an empty directory is harmless
    check_target_dir(tree / "new", flag="--dir", ours=ours, what="x")
    with pytest.raises(OutputPathError):
        check_target_dir(tree / "file", flag="--dir", ours=ours, what="x")
    assert calls == []
    assert check_target_dir(tree / "empty", flag="--dir", ours=ours, what="x") == tree / "empty"


def test_json_safe_writes_standard_json():
    """Records with NaN, tuples, non-string keys and objects become standard JSON (``NaN`` is not JSON)."""
    import json
    import math

    from kvpress_ext.storage.safe_write import json_safe

    class Thing:
        def __repr__(self):
            return "Thing()"

    record = {"ppl": math.nan, "speed": [math.inf, -math.inf, 1.5], 3: ("a", None, True), "press": Thing(),
              "nested": {"x": (1, {"y": math.nan})}}
    safe = json_safe(record)
    assert safe == {"ppl": None, "speed": [None, None, 1.5], "3": ["a", None, True], "press": "Thing()",
                    "nested": {"x": [1, {"y": None}]}}
    assert json.loads(json.dumps(safe, allow_nan=False)) == safe
