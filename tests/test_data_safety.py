"""Nothing lost, nothing silently wrong.

* Tamper tests for each saved format (a saved KV cache, an A3 chunk entry): truncation, flipped bytes, NaN/Inf,
  another model's weights, bad metadata (pickle, list, missing/extra/ill-typed keys), unknown versions and a
  pickle in place of the tensors are each refused with one line naming the fix; the repair path (save again /
  ``recompute_bad``) restores exactly the original tensors.
* Data-loss tests: an existing file or a user's directory at an output path is left byte for byte as it was,
  with exit status 2 and one line (``icl precompute --out``, ``a3 precompute --store``, ``--json``, ``--csv``,
  ``--output_dir``, ``--out_dir``).
* Recovery: a replacement killed between its renames is finished (or undone) by the next open, and stale
  ``.NAME.tmp-*`` temporaries are removed.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from conftest import REPO, shared_path
from transformers import DynamicCache

from kvpress_ext.cli import main
from kvpress_ext.core.errors import CacheFormatError, KVPressExtError
from kvpress_ext.presses.a3 import ChunkStore
from kvpress_ext.storage import cache_files as cache_io
from kvpress_ext.storage import safe_write as safe_io
from kvpress_ext.storage.cache_files import load_cache, model_fingerprint, save_cache
from kvpress_ext.storage.safe_write import OutputPathError
from kvpress_ext.testing import tiny_model

CHUNK = [5, 9, 17, 33, 65, 3, 7]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=2)


def _filled_cache(model):
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 5, 9, 17, 33, 65, 3, 7, 11]]), past_key_values=cache)
    return cache


def snapshot(root: Path) -> dict:
    """Every path under ``root`` (hidden ones too) with the sha256 of each file: equal snapshots = untouched."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


# --- the two saved formats, behind one interface ------------------------------------------------------------------
class IclCache:
    """A saved KV cache (``icl precompute`` output): load = load_cache(model); repair = save it again."""

    version_key = "format_version"
    missing_key = "seq_lengths"

    def __init__(self, tmp_path, model):
        self.model, self.dir = model, tmp_path / "cache"
        self.cache = _filled_cache(model)
        save_cache(self.cache, self.dir, model=model)
        self.original = load_cache(self.dir, model=model)[0]

    def load(self, model=None):
        return load_cache(self.dir, model=model or self.model)

    def repair(self):
        save_cache(self.cache, self.dir, model=self.model)  # replacing a damaged cache of ours is allowed
        loaded = load_cache(self.dir, model=self.model)[0]
        return [layer.keys for layer in loaded.layers], [layer.keys for layer in self.original.layers]

    def foreign(self, other):
        with pytest.raises(CacheFormatError, match="another model"):
            load_cache(self.dir, model=other)


class A3Entry:
    """One chunk entry of an A3 store: load = a fresh store's get; repair = recompute_bad=True."""

    version_key = "format"
    missing_key = "token_ids"

    def __init__(self, tmp_path, model):
        self.model, self.root = model, tmp_path / "store"
        self.original = ChunkStore(self.root, model).get(CHUNK)
        self.dir = ChunkStore(self.root, model).chunk_path(CHUNK)

    def load(self):
        return ChunkStore(self.root, self.model).get(CHUNK)

    def repair(self):
        store = ChunkStore(self.root, self.model, recompute_bad=True)
        entry = store.get(CHUNK)
        assert store.misses == 1
        return entry.keys + entry.values, self.original.keys + self.original.values

    def foreign(self, other):
        # another model's store directory holding this model's entry (copied there by hand)
        store = ChunkStore(self.root, other)
        target = store.chunk_path(CHUNK)
        target.parent.mkdir(parents=True)
        os.rename(self.dir, target)
        with pytest.raises(CacheFormatError, match="model fingerprint"):
            store.get(CHUNK)


FORMATS = {"icl_cache": IclCache, "a3_chunk": A3Entry}


def _meta(d: Path) -> dict:
    return json.loads((d / "metadata.json").read_text())


def _write_meta(d: Path, meta) -> None:
    (d / "metadata.json").write_text(json.dumps(meta))


def _refresh_checksum(d: Path) -> None:
    meta = _meta(d)
    meta["checksums"]["tensors.safetensors"] = cache_io.file_checksum(d / "tensors.safetensors")
    _write_meta(d, meta)


def _data_offset(f: Path) -> int:
    return 8 + struct.unpack("<Q", f.read_bytes()[:8])[0]


def _poke(d: Path, value: bytes, fix_checksum: bool) -> None:
    """Overwrite the first float32 of the tensor data with ``value`` (NaN, Inf or a flipped byte)."""
    f = d / "tensors.safetensors"
    data = bytearray(f.read_bytes())
    at = _data_offset(f) + 4 * 3
    data[at:at + len(value)] = value
    f.write_bytes(bytes(data))
    if fix_checksum:
        _refresh_checksum(d)


def _flip(d: Path) -> None:
    f = d / "tensors.safetensors"
    data = bytearray(f.read_bytes())
    at = (_data_offset(f) + len(data)) // 2
    data[at] ^= 0x40
    f.write_bytes(bytes(data))


def _truncate(d: Path) -> None:
    f = d / "tensors.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _pickle_tensors(d: Path, fix_checksum: bool) -> None:
    f = d / "tensors.safetensors"
    from safetensors.torch import load

    torch.save(load(f.read_bytes()), f)  # a pickle where safetensors belong: never unpickled
    if fix_checksum:
        _refresh_checksum(d)


def _extra_tensor(d: Path) -> None:
    from safetensors.torch import load, save_file

    f = d / "tensors.safetensors"
    tensors = load(f.read_bytes())
    tensors["smuggled"] = torch.zeros(3)
    save_file(tensors, str(f))
    _refresh_checksum(d)


def _edit_meta(fn):
    def tamper(d: Path, fmt) -> None:
        meta = _meta(d)
        result = fn(meta, fmt)
        _write_meta(d, meta if result is None else result)
    return tamper


NAN, INF = struct.pack("<f", float("nan")), struct.pack("<f", float("inf"))
TAMPERS = {
    "truncate": (lambda d, f: _truncate(d), "does not match its checksum"),
    "flip_data_byte": (lambda d, f: _flip(d), "does not match its checksum"),
    "nan_bytes": (lambda d, f: _poke(d, b"\xff\xff\xff\xff", False), "does not match its checksum"),
    "nan_with_forged_checksum": (lambda d, f: _poke(d, NAN, True), "NaN or Inf"),
    "inf_with_forged_checksum": (lambda d, f: _poke(d, INF, True), "NaN or Inf"),
    "pickle_as_tensors": (lambda d, f: _pickle_tensors(d, False), "does not match its checksum"),
    "pickle_as_tensors_forged_checksum": (lambda d, f: _pickle_tensors(d, True), "cannot read tensors.safetensors"),
    "extra_tensor": (lambda d, f: _extra_tensor(d), "other tensors"),
    "metadata_pickle": (lambda d, f: (d / "metadata.json").write_bytes(pickle.dumps(_meta(d))), "not valid JSON"),
    "metadata_list": (_edit_meta(lambda m, f: [m]), "JSON list, not an object"),
    "metadata_missing_key": (_edit_meta(lambda m, f: m.pop(f.missing_key) and None), "missing"),
    "metadata_extra_key": (_edit_meta(lambda m, f: m.update(surprise=1)), "unexpected surprise"),
    "metadata_missing_checksum": (_edit_meta(lambda m, f: m.pop("checksums") and None), "missing checksums"),
    "fingerprint_null": (_edit_meta(lambda m, f: m.update(model_fingerprint=None)), "invalid model_fingerprint"),
    "fingerprint_missing": (_edit_meta(lambda m, f: m.pop("model_fingerprint") and None), "missing model_fingerprint"),
    "version_0": (_edit_meta(lambda m, f: m.update({f.version_key: 0})), "unknown format version 0"),
    "version_negative": (_edit_meta(lambda m, f: m.update({f.version_key: -3})), "unknown format version -3"),
    "version_string": (_edit_meta(lambda m, f: m.update({f.version_key: "2"})), "unknown format version '2'"),
    "version_bool": (_edit_meta(lambda m, f: m.update({f.version_key: True})), "unknown format version True"),
    "version_missing": (_edit_meta(lambda m, f: m.pop(f.version_key) and None), "unknown format version None"),
    "version_newer": (_edit_meta(lambda m, f: m.update({f.version_key: 99})), "newer than this kvpress_ext"),
    "version_older": (_edit_meta(lambda m, f: m.update({f.version_key: 1})), "older than this kvpress_ext"),
}


@pytest.mark.slow
@pytest.mark.parametrize("tamper", list(TAMPERS))
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_tampered_file_is_refused_in_one_line_and_repaired(fmt, tamper, model, tmp_path):
    saved = FORMATS[fmt](tmp_path, model)
    apply, message = TAMPERS[tamper]
    apply(saved.dir, saved)
    with pytest.raises(CacheFormatError, match=message) as info:
        saved.load()
    assert "\n" not in str(info.value)
    if "version" in tamper and "newer" not in message:
        assert "newer" not in str(info.value)
    got, want = saved.repair()
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_foreign_weights_with_the_same_config_are_refused(fmt, model, tmp_path):
    other = tiny_model("llama", layers=2, seed=1)
    assert other.config.to_dict() == model.config.to_dict()
    assert model_fingerprint(other) != model_fingerprint(model)
    FORMATS[fmt](tmp_path, model).foreign(other)


def test_fingerprint_sees_weights_beyond_the_embedding(model):
    twin = tiny_model("llama", layers=2)
    assert model_fingerprint(twin) == model_fingerprint(model)  # same weights, same fingerprint
    with torch.no_grad():
        twin.model.layers[1].mlp.down_proj.weight.mul_(1.01)
    assert model_fingerprint(twin) != model_fingerprint(model)


def test_saving_nan_is_refused(model, tmp_path):
    cache = _filled_cache(model)
    cache.layers[1].values[0, 0, 2, 0] = float("nan")
    with pytest.raises(CacheFormatError, match="NaN or Inf"):
        save_cache(cache, tmp_path / "c", model=model)
    assert not (tmp_path / "c").exists()


# --- data loss: what is not ours stays as it was -------------------------------------------------------------------
def _user_files(tmp_path: Path) -> dict[str, Path]:
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    user_dir = tmp_path / "mydir"
    user_dir.mkdir()
    (user_dir / "thesis.tex").write_text("\\section{Intro}\n")
    return {"file": notes, "dir": user_dir}


def _run(capsys, *argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.err


def _assert_refused(rc, err, before, tmp_path):
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("target", ["file", "dir"])
@pytest.mark.parametrize("recompute", [False, True])
def test_icl_precompute_never_overwrites_what_is_not_a_cache(target, recompute, tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"question": "q", "solution": "s", "answer": "a"}]))
    out = _user_files(tmp_path)[target]
    before = snapshot(tmp_path)
    rc, err = _run(capsys, "icl", "precompute", "--data", data, "--model", "unused-model-never-loaded", "--out", out,
                   *(["--recompute"] if recompute else []))
    _assert_refused(rc, err, before, tmp_path)
    assert "not a kvpress-ext cache" in err


@pytest.mark.parametrize("target", ["file", "dir"])
def test_a3_precompute_never_writes_into_what_is_not_a_store(target, tmp_path, capsys):
    chunks = tmp_path / "chunks.json"
    chunks.write_text(json.dumps(["one chunk"]))
    store = _user_files(tmp_path)[target]
    before = snapshot(tmp_path)
    rc, err = _run(capsys, "a3", "precompute", "--model", "unused", "--chunks", chunks, "--store", store)
    _assert_refused(rc, err, before, tmp_path)
    rc, err = _run(capsys, "a3", "ask", "--model", "unused", "--chunks", chunks, "--store", store, "--question", "q",
                   "--compute_missing")
    _assert_refused(rc, err, before, tmp_path)


@pytest.mark.parametrize("target", ["file", "dir"])
def test_json_outputs_never_replace_other_files(target, tmp_path, capsys):
    out = _user_files(tmp_path)[target]
    chunks = tmp_path / "chunks.json"
    chunks.write_text(json.dumps(["one chunk"]))
    evals = tmp_path / "eval.json"
    evals.write_text(json.dumps({"records": []}))
    before = snapshot(tmp_path)
    for argv in (["generate", "--model", "unused", "--prompt", "hi", "--json", out],
                 ["a3", "ask", "--model", "unused", "--chunks", chunks, "--store", tmp_path / "s", "--question", "q",
                  "--compute_missing", "--json", out],
                 ["icl", "score", "--eval", evals, "--csv", out]):
        rc, err = _run(capsys, *argv)
        _assert_refused(rc, err, before, tmp_path)


def test_output_file_rule(tmp_path):
    js = tmp_path / "old.json"
    safe_io.write_output(js, '{"a": 1}')
    safe_io.write_output(js, '{"b": 2}')  # an earlier output (it carries our mark) is replaced, atomically
    assert json.loads(js.read_text()) == {"written_by": "kvpress-ext", "b": 2}
    (tmp_path / "users.json").write_text('{"a": 1}')
    with pytest.raises(OutputPathError, match="not a JSON output of kvpress-ext"):  # a user's JSON is not ours
        safe_io.write_output(tmp_path / "users.json", '{"b": 2}')
    safe_io.write_output(tmp_path / "new" / "deeper" / "out.json", "{}")  # missing directories are created
    empty = tmp_path / "empty.json"
    empty.touch()
    safe_io.write_output(empty, "{}")  # an empty file holds nothing to lose
    (tmp_path / "link.json").symlink_to(js)
    with pytest.raises(OutputPathError, match="symbolic link"):
        safe_io.write_output(tmp_path / "link.json", "{}")
    (tmp_path / "plot.png").write_text("not a png")
    with pytest.raises(OutputPathError, match="not a plot kvpress-ext made"):
        safe_io.check_output_file(tmp_path / "plot.png", kind="image", flag="--plot")
    with pytest.raises(OutputPathError, match="not a directory"):
        safe_io.check_output_file(js / "x.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.json", "link.json", "new", "old.json", "plot.png",
                                                          "users.json"]


def test_results_directories_must_be_ours(tmp_path, capsys):
    user_dir = _user_files(tmp_path)["dir"]
    with pytest.raises(OutputPathError, match="did not create"):
        safe_io.claim_output_dir(user_dir)
    before = snapshot(tmp_path)
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"question": "q", "solution": "s", "answer": "a"}]))
    before = snapshot(tmp_path)
    rc, err = _run(capsys, "icl", "grid", "--data", data, "--model", "unused", "--budgets", "16", "--out_dir", user_dir)
    _assert_refused(rc, err, before, tmp_path)
    spec = importlib.util.spec_from_file_location("ppl_script", REPO / "evaluation" / "perplexity.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    text = tmp_path / "t.txt"
    text.write_text("once upon a time " * 20)
    before = snapshot(tmp_path)
    rc = script.main(["--model", "unused", "--dataset", "text", "--text_file", str(text), "--press", "no_press",
                      "--output_dir", str(user_dir)])
    _assert_refused(rc, capsys.readouterr().err, before, tmp_path)
    assert script.main(["--summarize", str(user_dir)]) == 2
    # a directory of earlier results (summary + JSON objects only), or one marked ours, is reused
    old = tmp_path / "old_results"
    old.mkdir()
    (old / "summary.md").write_text("# Perplexity sweep\n")
    (old / "run.json").write_text("{}")
    assert safe_io.claim_output_dir(old) == old and (old / safe_io.RESULTS_MARKER).is_file()
    (user_dir / safe_io.RESULTS_MARKER).touch()
    assert safe_io.claim_output_dir(user_dir) == user_dir


def test_library_save_refuses_foreign_targets(model, tmp_path):
    files = _user_files(tmp_path)
    before = snapshot(tmp_path)
    for target in files.values():
        with pytest.raises(KVPressExtError, match="not a kvpress-ext cache"):
            save_cache(_filled_cache(model), target, model=model)
        with pytest.raises(KVPressExtError, match="not a kvpress-ext chunk store"):
            ChunkStore(target, model)
    assert snapshot(tmp_path) == before
    (tmp_path / "empty").mkdir()
    save_cache(_filled_cache(model), tmp_path / "empty", model=model)  # an empty directory is fine
    assert load_cache(tmp_path / "empty", model=model)[1]["num_layers"] == 2


@pytest.mark.slow
def test_perplexity_report_parses_arguments_and_writes_only_where_told(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("ppl_report", REPO / "evaluation" / "perplexity_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    tracked = REPO / "docs" / "results" / "perplexity_ratios.png"
    tracked_hash = hashlib.sha256(tracked.read_bytes()).hexdigest()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs" / "results").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--help"])
    assert exit_info.value.code == 0
    assert report.main([]) == 2  # no sweep results here: one line, nothing written
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert snapshot(tmp_path) == {"docs": "dir", "docs/results": "dir"}
    # with results, it writes exactly the two paths it is given
    def record(name, ppl):
        return {"press": {"name": name, "compression_ratio": None, "params": {}}, "status": "ok",
                "perplexity": {"ppl": ppl}, "cache": {"cache_bytes_end": 1000}, "speed": {"decode_tok_per_s": 50.0},
                "versions": {"torch": "t", "transformers": "tr", "kvpress": "k"}}
    for d, name, ppl in [("no_press", "no_press", 4.0), ("sweep_r0.25", "snapkv", 4.1), ("sweep_r0.5", "snapkv", 4.2),
                         ("sweep_r0.75", "snapkv", 4.4)]:
        (tmp_path / "res" / d).mkdir(parents=True)
        (tmp_path / "res" / d / "r.json").write_text(json.dumps(record(name, ppl)))
    assert report.main(["--results_dir", "res", "--markdown", "out/p.md", "--plot", "out/p.png"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p.md", "p.png"]
    assert "snapkv" in (tmp_path / "out" / "p.md").read_text()
    assert (tmp_path / "out" / "p.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in (tmp_path / "docs" / "results").iterdir()) == []
    assert hashlib.sha256(tracked.read_bytes()).hexdigest() == tracked_hash


# --- recovery of an interrupted replacement ------------------------------------------------------------------------
class Killed(BaseException):
    """Stands for SIGKILL: no handler of ours runs (replace_directory only cleans up after its write step)."""


def _kill_at_rename(monkeypatch, n):
    real, calls = os.rename, []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == n:
            raise Killed
        real(src, dst)

    monkeypatch.setattr(safe_io.os, "rename", rename)


@pytest.mark.parametrize("killed_at, expect", [(1, "old"), (2, "old"), (3, "new")])
def test_replacement_killed_between_renames_is_recovered(killed_at, expect, model, tmp_path, monkeypatch):
    """Renames: tmp -> .c.new-*, c -> .c.old-*, .c.new-* -> c. A kill before the third leaves no ``c``; the next
    open finishes the swap (the new cache is complete) or, before the new one was complete, keeps the old one."""
    path = tmp_path / "c"
    save_cache(_filled_cache(model), path, model=model, extra={"v": "old"})
    with monkeypatch.context() as m:
        _kill_at_rename(m, killed_at)
        with pytest.raises(Killed):
            save_cache(_filled_cache(model), path, model=model, extra={"v": "new"})
    if killed_at == 3:
        assert not path.exists() and [p.name[:7] for p in sorted(tmp_path.iterdir())] == [".c.new-", ".c.old-"]
    assert load_cache(path, model=model)[1]["extra"] == {"v": expect}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # nothing left over


def test_only_old_copy_left_is_restored_and_stale_temporaries_removed(model, tmp_path):
    path = tmp_path / "c"
    save_cache(_filled_cache(model), path, model=model, extra={"v": "old"})
    os.rename(path, tmp_path / ".c.old-123-0000dead")
    (tmp_path / ".c.tmp-456-0000dead").mkdir()
    (tmp_path / ".c.tmp-456-0000dead" / "tensors.safetensors").write_bytes(b"partial")
    assert load_cache(path, model=model)[1]["extra"] == {"v": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    # the same in an A3 store: a killed writer's temporary entry is removed when the entry is next opened
    store = ChunkStore(tmp_path / "s", model)
    entry = store.chunk_path(CHUNK)
    entry.parent.mkdir(parents=True)
    (entry.parent / f".{entry.name}.tmp-1-0000dead").mkdir()
    store.get(CHUNK)
    assert entry.is_dir() and not [p for p in entry.parent.iterdir() if p.name.startswith(".")]


def _save_then_die_at_third_rename(path):
    real, n = os.rename, [0]

    def rename(a, b):
        n[0] += 1
        if n[0] == 3:
            os._exit(9)  # like SIGKILL: no cleanup, no finally, the lock freed by the kernel
        real(a, b)

    safe_io.os.rename = rename
    model = tiny_model("llama", layers=2)
    save_cache(_filled_cache(model), path, model=model, extra={"v": "new"})
    os._exit(0)


def test_real_kill_between_renames_then_next_run_finishes(model, tmp_path):
    """The same with a real process (forked) that dies after moving the old cache aside."""
    import multiprocessing

    path = tmp_path / "c"
    save_cache(_filled_cache(model), path, model=model, extra={"v": "old"})
    proc = multiprocessing.get_context("fork").Process(target=_save_then_die_at_third_rename, args=(path,))
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == 9
    assert not path.exists()  # killed with the old cache moved aside and the new one not yet in place
    assert load_cache(path, model=model)[1]["extra"] == {"v": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # the dead writer's lock file is gone too


# --- command line: tampered files exit 2 with one line; the repair flag repairs ---------------------------------
@pytest.fixture(scope="module")
def stories_dir():
    return str(shared_path("models", "stories260k"))


@pytest.mark.slow
@pytest.mark.parametrize("tamper", ["flip_data_byte", "nan_with_forged_checksum", "metadata_pickle", "version_0",
                                    "version_missing", "metadata_extra_key"])
def test_cli_a3_tampered_entry_exits_2_then_recompute_bad_repairs(tamper, stories_dir, tmp_path, capsys):
    chunks = tmp_path / "chunks.json"
    chunks.write_text(json.dumps(["Tom had a big red ball.", "The dog was sad."]))
    store = tmp_path / "store"
    args = ["a3", "precompute", "--model", stories_dir, "--chunks", chunks, "--store", store]
    assert _run(capsys, *args)[0] == 0
    entries = sorted(p for p in store.glob("*/chunk-*"))
    good = {p.name: snapshot(p) for p in entries}
    TAMPERS[tamper][0](entries[0], A3Entry)
    rc, err = _run(capsys, *args)
    errors = [line for line in err.splitlines() if "error" in line]  # (stderr also holds the progress bar)
    assert rc == 2 and len(errors) == 1 and "--recompute_bad" in errors[0] and "Traceback" not in err, err
    assert _run(capsys, *args, "--recompute_bad")[0] == 0
    assert {p.name: snapshot(p) for p in entries} == good  # recomputed bit for bit (deterministic CPU forward)
    summary = json.loads((store / "precompute_summary.json").read_text())
    assert (summary["computed"], summary["reused"]) == (1, 1)


@pytest.mark.slow
@pytest.mark.parametrize("tamper", ["truncate", "inf_with_forged_checksum", "metadata_list", "fingerprint_missing",
                                    "version_string"])
def test_cli_icl_tampered_cache_exits_2_then_recompute_repairs(tamper, stories_dir, tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"question": "Tom has 2 apples and gets 3 more.", "solution": "5", "answer": "5"}]))
    out = tmp_path / "cache"
    pre = ["icl", "precompute", "--data", data, "--model", stories_dir, "--out", out, "--mode", "none",
           "--budget", "32", "--window_size", "4"]
    assert _run(capsys, *pre)[0] == 0
    TAMPERS[tamper][0](out, IclCache)
    for argv in (pre, ["icl", "eval", "--cache", out, "--model", stories_dir, "--question", "q", "--max_new_tokens",
                       "2", "--out", tmp_path / "e.json"]):
        rc, err = _run(capsys, *argv)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "e.json").exists()
    assert _run(capsys, *pre, "--recompute")[0] == 0
    assert load_cache(out)[1]["extra"]["mode"] == "none"


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_both_checksum_algorithms_verify_and_unknown_ones_are_refused(fmt, model, tmp_path):
    saved = FORMATS[fmt](tmp_path, model)
    assert _meta(saved.dir)["checksums"]["tensors.safetensors"].startswith("xxh3_128:")  # xxhash ships with datasets
    meta = _meta(saved.dir)
    meta["checksums"]["tensors.safetensors"] = cache_io.file_checksum(saved.dir / "tensors.safetensors", "sha256")
    _write_meta(saved.dir, meta)
    saved.load()  # a sha256 checksum (written where xxhash is missing) verifies too
    meta["checksums"]["tensors.safetensors"] = "md5:" + "0" * 32
    _write_meta(saved.dir, meta)
    with pytest.raises(CacheFormatError, match="invalid checksums"):
        saved.load()


@pytest.mark.parametrize("version, message", [(1, None), (0, "unknown"), (-1, "unknown"), ("1", "unknown"),
                                              (True, "unknown"), (2, "this version reads 1")])
def test_clusters_file_versions_and_centroids(version, message, tmp_path):
    """The third saved format, a clusters JSON file: known version only, finite centroids."""
    from kvpress_ext.icl.cluster import load_clusters
    from kvpress_ext.icl.workflow import ICLInputError

    saved = {"format": version, "embedder": "e", "centroids": [[0.5, 1.0]], "clusters": [[0]],
             "records": [{"question": "q"}]}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(saved))
    if message is None:
        assert load_clusters(path)["centroids"] == [[0.5, 1.0]]
        path.write_text(json.dumps(saved).replace("0.5", "NaN"))
        message = "non-finite centroids"
    with pytest.raises(ICLInputError, match=message):
        load_clusters(path)


# --- hostile inputs: ownership, links, leftovers, cell keys, last resort (docs/bad_input.md, "Hostile inputs") ---
def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_benchmarks_and_scripts_write_only_through_safe_write():
    import ast

    offenders = []
    for path in [*REPO.glob("benchmarks/*.py"), *REPO.glob("evaluation/*.py"), *REPO.glob("examples/*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("write_text", "write_bytes", "savefig"):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {node.func.attr}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open" and any(
                    isinstance(a, ast.Constant) and isinstance(a.value, str) and set(a.value) & set("wax")
                    for a in node.args[1:2]):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} open")
    assert offenders == []


def test_json_output_through_a_link_or_over_a_users_json_is_refused(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("my notes\n")
    (tmp_path / "link.json").symlink_to(victim)
    (tmp_path / "mine.json").write_text('{"my": 1}')
    before = snapshot(tmp_path)
    for target in ("link.json", "mine.json"):
        with pytest.raises(OutputPathError):
            safe_io.write_output(tmp_path / target, '{"result": 1}', flag="--json")
    assert snapshot(tmp_path) == before


def test_leftover_looking_names_are_not_adopted_unless_tagged_and_ours(model, tmp_path):
    keep = tmp_path / ".report.json.old-keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine\n")
    (tmp_path / ".mycache.old-1").mkdir()
    (tmp_path / ".mycache.old-1" / "metadata.json").write_text('{"kind": "kvpress_ext.kv_cache"}')
    tagged = tmp_path / ".other.old-123-0000beef"  # our tag, but nothing in it says it is ours
    tagged.mkdir()
    (tagged / "thesis.tex").write_text("x\n")
    before = snapshot(tmp_path)
    for name in ("report.json", "mycache", "other"):
        with safe_io.path_lock(tmp_path / name):
            assert safe_io.recover(tmp_path / name) == []
    assert safe_io.sweep(tmp_path) == []
    assert snapshot(tmp_path) == before
    safe_io.write_output(tmp_path / "report.json", '{"a": 1}')  # a writer beside them leaves them alone
    assert {p.name for p in tmp_path.iterdir()} >= {".report.json.old-keep", ".mycache.old-1", ".other.old-123-0000beef"}
    # a tagged leftover that is ours (a saved cache) is still restored
    save_cache(_filled_cache(model), tmp_path / "c", model=model)
    os.rename(tmp_path / "c", tmp_path / ".c.old-7-0000beef")
    assert load_cache(tmp_path / "c", model=model)[1]["num_layers"] == 2


@pytest.mark.parametrize("plant", ["symlink", "hardlink", "foreign_file"])
def test_a_planted_lock_file_is_never_written_through(plant, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("the first bytes of this file must stay\n")
    lock = safe_io.lock_path(tmp_path / "out.json")
    if plant == "symlink":
        lock.symlink_to(victim)
    elif plant == "hardlink":
        os.link(victim, lock)
    else:
        lock.write_text("not a pid, a user's file\n")
    before = snapshot(tmp_path)
    with pytest.raises(OutputPathError, match="lock file"):
        safe_io.write_output(tmp_path / "out.json", '{"a": 1}')
    assert snapshot(tmp_path) == before
    # a lock file a killed kvpress-ext left (a pid) is reused and removed
    lock.unlink()
    lock.write_text(f"{99999999:<12d}")
    safe_io.write_output(tmp_path / "out.json", '{"a": 1}')
    assert not os.path.lexists(lock) and victim.read_text().startswith("the first bytes")


def test_cli_lock_link_and_foreign_json_exit_2_with_the_users_file_intact(stories_dir, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    safe_io.lock_path(tmp_path / "out.json").symlink_to(victim)
    save_cache(_filled_cache(tiny_model("llama", layers=2)), tmp_path / "cache", model=tiny_model("llama", layers=2))
    before = snapshot(tmp_path)
    for target in (tmp_path / "out.json", tmp_path / "cache" / "metadata.json"):
        rc = main(["generate", "--model", stories_dir, "--prompt", "Once", "--max_new_tokens", "2", "--no_progress",
                   "--json", str(target)])
        line = _one_line(capsys.readouterr().err)
        assert rc == 2 and ("symbolic link" in line or "not a JSON output of kvpress-ext" in line), line
    assert snapshot(tmp_path) == before


def test_cells_folder_that_is_a_link_is_refused(tmp_path):
    from kvpress_ext.evaluation.sweep import Cell, run_sweep

    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / safe_io.RESULTS_MARKER).write_text("ours\n")
    (out / "cells").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(OutputPathError, match="cells is a symbolic link"):
        run_sweep([Cell("a", {"x": 1})], _double, out)
    assert list(elsewhere.iterdir()) == []


def _double(params: dict) -> dict:
    return {"y": 2 * params["x"], "n": params.get("n")}


def test_cell_key_holds_every_setting_and_two_sweeps_keep_their_cells(tmp_path):
    from kvpress_ext.evaluation.sweep import Cell, SweepOptions, cell_digest, load_cells, run_sweep

    quiet = SweepOptions(progress=False)
    first = run_sweep([Cell("a", {"x": 1, "n": 128})], _double, tmp_path, quiet)
    second = run_sweep([Cell("a", {"x": 1, "n": 192})], _double, tmp_path, quiet)  # same key, other setting
    assert first.skipped == [] and second.skipped == [] and second.records["a"]["n"] == 192
    assert sorted(c["params"]["n"] for c in load_cells(tmp_path)) == [128, 192]  # neither overwrote the other
    again = run_sweep([Cell("a", {"x": 1, "n": 128, "_progress": "context only"})], _double, tmp_path, quiet)
    assert again.skipped == ["a"] and again.records["a"]["n"] == 128
    assert cell_digest({"x": 1, "n": 128}) == cell_digest({"n": 128, "x": 1, "_c": 3}) != cell_digest({"x": 1})


def _knorm_sweep(stories_dir, tmp_path, *ratios: str) -> tuple:
    """(text file, output folder, perplexity.py arguments) of a knorm sweep over a short story at ``ratios``."""
    text = tmp_path / "story.txt"
    text.write_text("Tom had a red ball. He played in the park with his dog. " * 12)
    out = tmp_path / "out"
    argv = ["--model", stories_dir, "--dataset", "text", "--text_file", str(text), "--press", "knorm",
            "--compression_ratio", *ratios, "--no_speed", "--no_progress", "--num_threads", "1", "--no_baseline",
            "--output_dir", str(out)]
    return text, out, argv


def test_perplexity_cells_follow_the_text_contents_and_summaries_refuse_mixed_settings(stories_dir, tmp_path, capsys):
    from kvpress_ext.cli.perplexity import main as ppl_main

    text, out, argv = _knorm_sweep(stories_dir, tmp_path, "0.5")
    argv += ["--max_eval_tokens", "48"]
    assert ppl_main(argv) == 0
    assert ppl_main(argv) == 0  # unchanged: reused
    assert len(list((out / "cells").glob("*.json"))) == 1
    text.write_text("Lily liked to bake cakes with her mom on sunny days. " * 12)  # same path, other contents
    assert ppl_main(argv) == 0
    cells = [json.loads(p.read_text()) for p in (out / "cells").glob("*.json")]
    assert len(cells) == 2 and len({c["params"]["inputs"]["text"] for c in cells}) == 2  # computed anew, kept apart
    capsys.readouterr()
    assert ppl_main(["--summarize", str(out)]) == 2
    assert "different settings" in _one_line(capsys.readouterr().err)


def test_two_sweeps_in_one_folder_keep_their_own_run_files_and_reports_refuse_to_mix_them(stories_dir, tmp_path):
    from kvpress_ext.cli.perplexity import main as ppl_main
    from kvpress_ext.evaluation import results

    _text, out, argv = _knorm_sweep(stories_dir, tmp_path, "0.25", "0.5")
    argv += ["--max_eval_tokens"]
    assert ppl_main([*argv, "48"]) == 0
    first = {p.name: p.read_bytes() for p in out.glob("*.json")}
    assert ppl_main([*argv, "64"]) == 0  # the same presses and ratios, another setting, the same folder
    runs = [json.loads(p.read_text()) for p in out.glob("*.json")]
    assert sorted(r["data"]["max_eval_tokens"] for r in runs) == [48, 48, 64, 64]
    assert {name: (out / name).read_bytes() for name in first} == first  # the first sweep's run files untouched
    for report in (lambda: results.ratio_table({0.25: out}), lambda: results.run_records(out)):
        with pytest.raises(KVPressExtError, match="2 different settings"):
            report()
    assert ppl_main([*argv, "48"]) == 0 and len(list(out.glob("*.json"))) == 4  # a rerun reuses its own files


def test_last_resort_errors_are_one_line_exit_2(capsys):
    from kvpress_ext.cli.common import command_entry

    for exc, words in [(RecursionError("maximum recursion depth exceeded"), "nested too deeply"),
                       (OverflowError("int too large to convert"), "out of range"),
                       (MemoryError(), "ran out of memory"),
                       (OSError(errno.EROFS, "Read-only file system", "/ro/out.json"), "cannot write (/ro/out.json)")]:
        def boom(exc=exc):
            raise exc
        assert command_entry("x")(boom)() == 2
        line = _one_line(capsys.readouterr().err)
        assert line.startswith("x: error: ") and words in line, line


# --- 17. a read-only file system, an output folder removed mid-run, a full disk --------------------------------
WRITE_ERRORS = {"read_only": (errno.EROFS, "cannot write"), "folder_removed": (errno.ENOENT, "removed while the command"),
                "disk_full": (errno.ENOSPC, "the disk is full")}


def _write_commands(model_dir: str, w: Path) -> dict:
    """Per command, a first run (its outputs are what must survive) and a second one that has to write again."""
    from kvpress_ext.cli.perplexity import main as ppl_main

    ppl = ["--model", model_dir, "--dataset", "text", "--text_file", str(w / "story.txt"), "--max_eval_tokens", "48",
           "--press", "knorm", "--no_speed", "--no_progress", "--num_threads", "1", "--output_dir", str(w / "ppl"),
           "--no_baseline", "--compression_ratio"]
    pre = ["icl", "precompute", "--model", model_dir, "--data", str(w / "docs.json"), "--out", str(w / "cache"),
           "--budget", "16", "--window_size", "4", "--mode", "none"]
    grid = ["icl", "grid", "--model", model_dir, "--data", str(w / "docs.json"), "--window_size", "4", "--modes",
            "none", "--out_dir", str(w / "grid"), "--no_progress", "--budgets"]
    gen = ["generate", "--model", model_dir, "--prompt", "Once", "--max_new_tokens", "2", "--no_progress", "--json",
           str(w / "out.json")]
    return {"generate --json": (main, gen, gen), "perplexity.py": (ppl_main, [*ppl, "0.5"], [*ppl, "0.25"]),
            "icl precompute": (main, pre, [*pre, "--recompute"]), "icl grid": (main, [*grid, "16"], [*grid, "12"])}


@pytest.fixture(scope="module")
def written(stories_dir, tmp_path_factory):
    """A folder holding every command's outputs of a first, successful run."""
    w = tmp_path_factory.mktemp("written")
    (w / "story.txt").write_text("Tom had a red ball. He played in the park with his dog. " * 12)
    (w / "docs.json").write_text(json.dumps([{"question": "What is 2 + 3?", "solution": "2 + 3 = 5.", "answer": "5"}]))
    commands = _write_commands(stories_dir, w)
    for runner, first, _ in commands.values():
        assert runner(first) == 0
    return w, commands


@pytest.mark.parametrize("failure", list(WRITE_ERRORS))
@pytest.mark.parametrize("command", ["generate --json", "perplexity.py", "icl precompute", "icl grid"])
def test_write_failures_are_one_line_exit_2_and_lose_nothing(written, command, failure, capsys, monkeypatch):
    """The errno is raised where the safe-writing layer creates every temporary file or folder (each writer's
    first write): a read-only file system, the folder gone, a full disk. Root ignores chmod, so it is injected.
    A run's own folder (``icl grid``'s ``b12_none``) may be left created and empty; no file may appear."""
    w, commands = written
    code, words = WRITE_ERRORS[failure]

    def refuse(path, directory):
        raise OSError(code, os.strerror(code), str(Path(path).parent))

    runner, _, again = commands[command]
    before = snapshot(w)
    monkeypatch.setattr(safe_io, "temporary_sibling", refuse)
    capsys.readouterr()
    assert runner(again) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(("kvpress-ext: error: ", "perplexity: error: ")) and words in line, line
    after = snapshot(w)
    assert {k: after.get(k) for k in before} == before  # the first run's outputs intact, byte for byte
    new = {k: v for k, v in after.items() if k not in before}
    assert set(new.values()) <= {"dir"} and not any(os.listdir(w / k) for k in new), new  # no file, no temporary


def test_registry_names_are_ascii_and_plugin_entries_are_checked():
    from kvpress_ext.core.registry import add_press, get_press
    from kvpress_ext.core.tables import InvalidName
    from kvpress_ext.runtime.models import ModelLoadError, register_model

    class Boom:
        def __init__(self, **kwargs):
            raise RuntimeError("cannot build")

    for name in ("kn\u043erm", "\uff4b\uff4e\uff4f\uff52\uff4d"):  # Cyrillic o; fullwidth letters
        with pytest.raises(KVPressExtError):
            add_press(name, Boom, source="hostile_plugin")
        with pytest.raises(InvalidName):
            register_model(name, lambda: "/nowhere", plugin="hostile_plugin")
    with pytest.raises(ModelLoadError, match="context='huge'"):
        register_model("hostile-model", lambda: "/nowhere", context="huge", plugin="hostile_plugin")
    from kvpress_ext.core.tables import remove_origin_everywhere

    try:
        add_press("boom_press", Boom, source="hostile_plugin")
        with pytest.raises(KVPressExtError, match="could not be built"):
            get_press("boom_press")
    finally:
        remove_origin_everywhere("hostile_plugin")


# --- 19. a damaged chunk entry: the reason is kept, and a store we cannot write gets a fix that works ----------
@pytest.mark.parametrize("command", ["ask", "precompute --recompute_bad"])
def test_damaged_entry_of_a_read_only_store_names_the_reason_and_a_writable_copy(command, stories_dir, tmp_path,
                                                                                   capsys, monkeypatch):
    import contextlib

    from kvpress_ext.storage import chunk_store

    chunks = tmp_path / "chunks.json"
    chunks.write_text(json.dumps(["Tom had a big red ball.", "The dog was sad."]))
    store = tmp_path / "store"
    common = ["--model", stories_dir, "--chunks", str(chunks), "--store", str(store)]
    assert main(["a3", "precompute", *common]) == 0
    tensors = min(store.glob("*/chunk-*/tensors.safetensors"))
    data = bytearray(tensors.read_bytes())
    data[-5] ^= 0xFF
    tensors.write_bytes(bytes(data))
    before = snapshot(tmp_path)

    @contextlib.contextmanager
    def read_only(path, **kwargs):  # what path_lock meets on a read-only file system (root ignores chmod)
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        yield

    monkeypatch.setattr(chunk_store, "path_lock", read_only)
    argv = {"ask": ["a3", "ask", *common, "--question", "Tom gave the dog", "--max_new_tokens", "2"],
            "precompute --recompute_bad": ["a3", "precompute", *common, "--recompute_bad"]}[command]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    [line] = [x for x in err.splitlines() if "error:" in x]  # (precompute's stderr also holds its progress bar)
    assert "Traceback" not in err, err
    assert "does not match its checksum" in line and "cannot be written here (Read-only file system)" in line, line
    assert "copy it to a folder you may write" in line and "ChunkStore" not in line and "=True" not in line, line
    assert snapshot(tmp_path) == before
