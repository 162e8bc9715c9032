"""A³'s chunk store (storage/chunk_store.py, with the encoding in presses/a3/chunk_store.py): what is on disk
(names, metadata, tensors) against a from-scratch forward pass, each refusal's one-line message, the read-only and
surprisal paths, locks, and which directories count as a store root."""

from __future__ import annotations

import errno
import hashlib
import json
import re
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DynamicCache

from kvpress_ext.core.errors import CacheFormatError
from kvpress_ext.presses.a3 import ChunkStore
from kvpress_ext.storage import chunk_store as CS
from kvpress_ext.storage.cache_files import file_checksum, model_fingerprint
from kvpress_ext.storage.chunk_store import ChunkKV, check_store_root, is_store_root
from kvpress_ext.storage.safe_write import OutputPathError
from kvpress_ext.testing import tiny_model, tiny_tokenizer

CHUNK = [5, 9, 17, 33, 65, 3, 7]
TOL = 1e-6  # the same float32 forward pass, run twice


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def _cache_of(model, ids):
    cache = DynamicCache()
    with torch.no_grad():
        out = model(torch.tensor([ids]), past_key_values=cache)
    return cache, out.logits[0]


def _rewrite(path, tensors=None, meta=None):
    """Replace an entry's tensors and/or metadata, with a correct checksum (a consistent but wrong entry)."""
    m = json.loads((path / "metadata.json").read_text())
    if tensors is not None:
        save_file(tensors, str(path / "tensors.safetensors"))
        m["checksums"]["tensors.safetensors"] = file_checksum(path / "tensors.safetensors")
    if meta is not None:
        m.update(meta)
    (path / "metadata.json").write_text(json.dumps(m))


# --- what is written ------------------------------------------------------------------------------------------
def test_entry_on_disk_is_the_chunks_slice_of_a_full_forward(model, tmp_path):
    """Keys/values of ``prefix + chunk`` from one forward pass, sliced after the prefix; the metadata says what
    they are; the prefix entry is the prefix's own cache; names follow the documented hash of the ids."""
    store = ChunkStore(tmp_path, model)
    entry = store.get(CHUNK)
    cache, _ = _cache_of(model, [1] + CHUNK)
    assert len(entry) == len(CHUNK) and entry.token_ids == CHUNK and entry.prefix_len == 1 and entry.surprisal is None
    assert len(entry.keys) == len(entry.values) == 2
    for i in range(2):
        assert entry.keys[i].shape == (1, 2, len(CHUNK), 16) or entry.keys[i].shape[-2] == len(CHUNK)
        assert (entry.keys[i] - cache.layers[i].keys[:, :, 1:]).abs().max() < TOL
        assert (entry.values[i] - cache.layers[i].values[:, :, 1:]).abs().max() < TOL
    path = store.chunk_path(CHUNK)

    def sha(*lists):
        h = hashlib.sha256()
        for ids in lists:
            h.update(json.dumps(ids).encode() + b"|")
        return h.hexdigest()[:32]

    fp = model_fingerprint(model)
    assert path == tmp_path / fp / f"chunk-{sha([1], CHUNK)}" and store.directory == tmp_path / fp
    assert store.prefix_path() == tmp_path / fp / f"prefix-{sha([1])}"
    assert store.chunk_path(CHUNK, prefix_ids=[1, 4]) == tmp_path / fp / f"chunk-{sha([1, 4], CHUNK)}"
    meta = json.loads((path / "metadata.json").read_text())
    assert meta == {
        "kind": "kvpress_ext.a3_chunk", "format": 2, "model_fingerprint": fp,
        "model_name": model.config._name_or_path, "token_ids": CHUNK, "prefix_len": 1, "num_layers": 2,
        "key_layout": "post-rope at local positions prefix_len + j", "dtype": "torch.float32",
        "checksums": {"tensors.safetensors": file_checksum(path / "tensors.safetensors")},
    }
    on_disk = load_file(str(path / "tensors.safetensors"))
    assert set(on_disk) == {"layer0.keys", "layer0.values", "layer1.keys", "layer1.values"}
    assert torch.equal(on_disk["layer1.values"], entry.values[1])
    assert json.loads((tmp_path / "store.json").read_text()) == {"kind": "kvpress_ext.a3_chunk_store", "format": 2}
    prefix = store.prefix()
    assert prefix.token_ids == [1] and prefix.prefix_len == 0 and len(prefix) == 1
    assert all((prefix.keys[i] - cache.layers[i].keys[:, :, :1]).abs().max() < TOL for i in range(2))
    assert prefix.surprisal is None  # computed without logits; its file holds the layers only
    assert set(load_file(str(store.prefix_path() / "tensors.safetensors"))) == set(on_disk)
    pmeta = json.loads((store.prefix_path() / "metadata.json").read_text())
    assert pmeta["token_ids"] == [1] and pmeta["prefix_len"] == 0
    assert store.precompute([CHUNK, [8, 8]]) == [path, store.chunk_path([8, 8])]
    assert store.contains([8, 8]) and not store.contains([8, 9])


def test_other_prefixes_and_no_prefix(model, tmp_path):
    """An explicit prefix replaces BOS; a model without a BOS id encodes chunks from nothing."""
    store = ChunkStore(tmp_path / "a", model, prefix_ids=[1, 40, 41])
    entry = store.get(CHUNK)
    cache, _ = _cache_of(model, [1, 40, 41] + CHUNK)
    assert entry.prefix_len == 3 and store.prefix_ids == [1, 40, 41]
    assert (entry.keys[1] - cache.layers[1].keys[:, :, 3:]).abs().max() < TOL
    other = store.get(CHUNK, prefix_ids=[1])  # per call
    assert other.prefix_len == 1 and not torch.equal(other.values[1], entry.values[1])
    assert store.prefix([1, 40]).token_ids == [1, 40]
    paths = store.precompute([[8, 9], CHUNK], prefix_ids=[1])  # the per-call prefix reaches the entries and paths
    assert paths == [store.chunk_path([8, 9], [1]), store.chunk_path(CHUNK, [1])] and all(p.is_dir() for p in paths)
    assert paths[0] != store.chunk_path([8, 9]) and not store.contains([8, 9]) and store.contains([8, 9], prefix_ids=[1])
    assert json.loads((paths[0] / "metadata.json").read_text())["prefix_len"] == 1
    nobos = tiny_model("llama", layers=2)
    nobos.config.bos_token_id = None
    bare = ChunkStore(tmp_path / "b", nobos)
    assert bare.prefix_ids == []
    del nobos.config.bos_token_id  # a config class without the attribute at all (transformers 5's base config)
    assert not hasattr(nobos.config, "bos_token_id") and ChunkStore(tmp_path / "c", nobos).prefix_ids == []
    entry = bare.get(CHUNK)
    cache, _ = _cache_of(nobos, CHUNK)
    assert entry.prefix_len == 0 and (entry.values[0] - cache.layers[0].values).abs().max() < TOL
    assert (entry.keys[1] - cache.layers[1].keys).abs().max() < TOL
    with pytest.raises(ValueError, match="the prefix is empty"):  # not a torch error from an empty float tensor
        bare.prefix()
    with pytest.raises(ValueError, match="the prefix is empty"):
        store.prefix([])


def test_surprisal_is_stored_per_token_and_recomputed_when_needed(model, tmp_path):
    _, logits = _cache_of(model, [1] + CHUNK)
    logp = logits.double().log_softmax(-1)
    want = torch.tensor([0.0] + [-float(logp[j, CHUNK[j]]) for j in range(1, len(CHUNK))])  # row j predicts j+1
    store = ChunkStore(tmp_path, model, save_surprisal=True)
    entry = store.get(CHUNK)
    assert entry.surprisal.dtype == torch.float32 and (entry.surprisal.double() - want).abs().max() < 1e-5
    again = ChunkStore(tmp_path, model).get(CHUNK, need_surprisal=True)  # read back
    assert torch.equal(again.surprisal, entry.surprisal)
    # a plain entry: need_surprisal recomputes it only when the store may save surprisal
    plain = ChunkStore(tmp_path / "p", model)
    plain.get(CHUNK)
    with pytest.raises(CacheFormatError, match=r"has no stored surprisal; build the store with save_surprisal=True\.$"):
        plain.get(CHUNK, need_surprisal=True)
    assert plain.misses == 2 and plain.hits == 0  # the prefix and the chunk
    upgrading = ChunkStore(tmp_path / "p", model, save_surprisal=True)
    got = upgrading.get(CHUNK, need_surprisal=True)
    assert upgrading.misses == 1 and upgrading.hits == 1  # the chunk again (the prefix is reused)
    assert (got.surprisal.double() - want).abs().max() < 1e-5
    assert (load_file(str(plain.chunk_path(CHUNK) / "tensors.safetensors"))["surprisal"] == got.surprisal).all()
    assert torch.equal(ChunkStore(tmp_path / "p", model).get(CHUNK, need_surprisal=True).surprisal, got.surprisal)


def test_hits_and_misses(model, tmp_path):
    store = ChunkStore(tmp_path, model)
    store.get(CHUNK)
    assert (store.hits, store.misses) == (0, 2)
    store.get(CHUNK)
    assert (store.hits, store.misses) == (1, 2)
    reader = ChunkStore(tmp_path, model)
    reader.get(CHUNK)
    reader.prefix()
    assert (reader.hits, reader.misses) == (2, 0)


def test_text_chunks_and_bad_chunks(model, tmp_path):
    tok = tiny_tokenizer()
    store = ChunkStore(tmp_path, model, tok)
    assert store.encode("Hi!") == tok("Hi!", add_special_tokens=False)["input_ids"] == [44, 77, 5]
    assert store.get("Hi!").token_ids == [44, 77, 5]
    assert store.encode((4, 5)) == [4, 5]
    with pytest.raises(ValueError, match=r"^ChunkStore got a text chunk but no tokenizer: pass tokenizer= or token ids\.$"):
        ChunkStore(tmp_path, model).get("Hi!")
    with pytest.raises(ValueError, match=r"^Cannot store an empty chunk\.$"):
        store.get([])


# --- what is refused -----------------------------------------------------------------------------------------
def _entry(model, tmp_path, **kwargs):
    store = ChunkStore(tmp_path, model, **kwargs)
    store.get(CHUNK)
    return store.chunk_path(CHUNK)


def _refused(model, tmp_path, match):
    store = ChunkStore(tmp_path, model)
    with pytest.raises(CacheFormatError, match=match) as info:
        store.get(CHUNK)
    assert "\n" not in str(info.value) and str(info.value).startswith(f"Chunk entry {store.chunk_path(CHUNK)}")
    assert re.search(r"[;,] (or )?recompute it \(recompute_bad=True\) or delete the directory\.?$", str(info.value))
    return str(info.value)


def test_mismatched_metadata_names_every_problem(model, tmp_path):
    path = _entry(model, tmp_path)
    _rewrite(path, meta={"model_fingerprint": "f" * 16, "prefix_len": 2, "num_layers": 3})
    msg = _refused(model, tmp_path, "does not match")
    fp = model_fingerprint(model)
    assert msg == (f"Chunk entry {path} does not match: model fingerprint {'f' * 16} != {fp}; prefix length 2 != 1; "
                   f"3 layers stored, model has 2; recompute it (recompute_bad=True) or delete the directory.")
    _rewrite(path, meta={"model_fingerprint": fp, "prefix_len": 1, "num_layers": 2, "token_ids": CHUNK[:-1]})
    assert "does not match: stored token ids differ from the chunk's;" in _refused(model, tmp_path, "token ids")


@pytest.mark.parametrize("field,value", [
    ("kind", "kvpress_ext.cache"), ("model_fingerprint", 3), ("model_name", 3), ("token_ids", []),
    ("token_ids", [1.5]), ("token_ids", "abc"), ("prefix_len", "1"), ("num_layers", 0), ("key_layout", "pre-rope"),
    ("dtype", None), ("checksums", {}), ("checksums", {"tensors.safetensors": "md5:00"}),
    ("checksums", {"other": "sha256:" + "0" * 64}),
])
def test_ill_typed_metadata_is_refused(model, tmp_path, field, value):
    path = _entry(model, tmp_path)
    _rewrite(path, meta={field: value})
    _refused(model, tmp_path, rf"metadata.json is not valid \(invalid {field}\)")


@pytest.mark.parametrize("text,match", [
    ("{not json", "metadata.json is not valid JSON"), ("[1]", "metadata.json holds a JSON list, not an object"),
    ('{"kind": "kvpress_ext.a3_chunk"}', "unknown format version None"),
    ('{"format": 3}', r"format version 3, newer than this kvpress_ext understands \(2\); upgrade kvpress-ext, or"),
    ('{"format": 1}', r"format version 1, older than this kvpress_ext reads \(2\)"),
])
def test_unreadable_metadata_is_refused(model, tmp_path, text, match):
    path = _entry(model, tmp_path)
    (path / "metadata.json").write_text(text)
    _refused(model, tmp_path, match)
    (path / "metadata.json").unlink()
    _refused(model, tmp_path, "metadata.json is missing")


def test_valid_metadata_edges_are_accepted(model, tmp_path):
    """model_name may be null, a one-layer model stores one layer."""
    path = _entry(model, tmp_path)
    _rewrite(path, meta={"model_name": None})
    assert ChunkStore(tmp_path, model).get(CHUNK).token_ids == CHUNK
    one = tiny_model("llama", layers=1)
    entry = ChunkStore(tmp_path / "one", one).get(CHUNK)
    assert len(entry.keys) == 1
    assert ChunkStore(tmp_path / "one", one).get(CHUNK).prefix_len == 1


def test_wrong_tensors_are_refused(model, tmp_path):
    path = _entry(model, tmp_path)
    good = load_file(str(path / "tensors.safetensors"))
    extra = dict(good, junk=torch.zeros(1))
    _rewrite(path, tensors=extra)
    assert _refused(model, tmp_path, "holds other tensors") == (
        f"Chunk entry {path}: tensors.safetensors holds other tensors than a chunk entry has; "
        "recompute it (recompute_bad=True) or delete the directory.")
    _rewrite(path, tensors={k: v for k, v in good.items() if k != "layer1.values"})
    _refused(model, tmp_path, "holds other tensors")
    for name, bad in [("layer0.keys", good["layer0.keys"][0]), ("layer1.values", good["layer1.values"][:, :, 1:]),
                      ("layer1.keys", good["layer1.keys"][:, :, 1:]), ("layer0.values", good["layer0.values"][None])]:
        _rewrite(path, tensors=dict(good, **{name: bad.contiguous()}))
        layer = name[5]
        message = _refused(model, tmp_path, f"layer {layer} holds (tensors of shape|6 tokens)")
        assert message.startswith(f"Chunk entry {path}: layer {layer} holds ") and message.endswith(
            "; recompute it (recompute_bad=True) or delete the directory.")
    _rewrite(path, tensors=dict(good, surprisal=torch.zeros(len(CHUNK) + 1)))
    assert _refused(model, tmp_path, "surprisal has") == (
        f"Chunk entry {path}: surprisal has {len(CHUNK) + 1} values, chunk has {len(CHUNK)} tokens; "
        "recompute it (recompute_bad=True) or delete the directory.")
    nan = dict(good)
    nan["layer1.keys"] = good["layer1.keys"].clone()
    nan["layer1.keys"][0, 0, 0, 0] = float("nan")
    _rewrite(path, tensors=nan)
    _refused(model, tmp_path, "layer1.keys holds NaN or Inf")
    _rewrite(path, tensors=dict(good, surprisal=torch.zeros(len(CHUNK))))  # a consistent entry loads again
    assert ChunkStore(tmp_path, model).get(CHUNK, need_surprisal=True).surprisal.tolist() == [0.0] * len(CHUNK)


def test_damaged_tensor_file_is_refused(model, tmp_path):
    path = _entry(model, tmp_path)
    data = bytearray((path / "tensors.safetensors").read_bytes())
    data[-3] ^= 0xFF  # one flipped byte of a value: the checksum no longer matches
    (path / "tensors.safetensors").write_bytes(bytes(data))
    _refused(model, tmp_path, "tensors.safetensors")
    (path / "tensors.safetensors").unlink()
    _refused(model, tmp_path, "tensors.safetensors")


def test_missing_entry_directory_and_recompute_bad(model, tmp_path):
    path = _entry(model, tmp_path)
    good = ChunkStore(tmp_path, model).get(CHUNK)
    (path / "metadata.json").write_text("[]")
    fixed = ChunkStore(tmp_path, model, recompute_bad=True)
    again = fixed.get(CHUNK)
    assert fixed.misses == 1 and all(torch.equal(a, b) for a, b in zip(again.keys, good.keys))
    store = ChunkStore(tmp_path, model)
    with pytest.raises(CacheFormatError, match=r"is missing or not a directory; recompute it"):
        store._load(store.chunk_path([4, 4]), [4, 4], [1])


def test_nan_from_the_model_is_not_saved(model, tmp_path):
    store = ChunkStore(tmp_path, model)
    bad = ChunkKV([4], [torch.full((1, 2, 1, 16), float("nan"))] * 2, [torch.zeros(1, 2, 1, 16)] * 2, 1)
    with pytest.raises(CacheFormatError, match=r"\(not saved\): tensor layer0.keys holds NaN or Inf values; "
                                               r"the model produced them; check the dtype and inputs$"):
        store._save(store.chunk_path([4]), bad)
    assert not store.chunk_path([4]).exists()


# --- read-only stores and the root ------------------------------------------------------------------------------
@contextmanager
def _read_only(monkeypatch, code):
    def refuse(path, *a, **k):
        raise OSError(code, "refused")

    with monkeypatch.context() as m:
        m.setattr(CS, "path_lock", refuse)
        yield


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.EPERM])
def test_read_only_store_serves_entries_and_computes_nothing(model, tmp_path, monkeypatch, code):
    _entry(model, tmp_path)
    (ChunkStore(tmp_path, model).chunk_path(CHUNK) / "metadata.json").write_text("{}")
    with _read_only(monkeypatch, code):
        store = ChunkStore(tmp_path, model, recompute_bad=True)
        assert store.prefix().token_ids == [1] and store.hits == 1
        with pytest.raises(CacheFormatError, match="unknown format version None"):  # damaged: reported, not recomputed
            store.get(CHUNK)
        with pytest.raises(CacheFormatError, match="is missing or not a directory"):
            store.get([4, 4])
        assert store.misses == 0 and not store.chunk_path([4, 4]).exists()


def test_killed_replacements_are_restored_and_hits_take_no_lock(model, tmp_path, monkeypatch):
    """A writer killed between its renames leaves only ``.NAME.old-*``: the first lookup in the directory restores
    every such entry (one sweep per directory), a later one is restored under the entry's lock when asked for;
    either way it is a hit, not a recomputation. A hit never takes a lock; a read-only store restores nothing."""
    store = ChunkStore(tmp_path, model, save_surprisal=True)
    store.get(CHUNK)
    b = store.get([8, 9, 10])
    pb = store.chunk_path([8, 9, 10])

    def kill_b(tag):
        pb.rename(pb.parent / f".{pb.name}.old-{tag}-0000dead")  # the tag temporary_sibling makes

    def leftovers():
        return sorted(p.name for p in pb.parent.iterdir() if ".old-" in p.name)

    swept = []
    real_sweep = CS.sweep
    monkeypatch.setattr(CS, "sweep", lambda d: swept.append(d) or real_sweep(d))
    kill_b(1)
    fresh = ChunkStore(tmp_path, model)
    fresh.get(CHUNK)
    assert pb.is_dir() and leftovers() == [] and (fresh.hits, fresh.misses) == (1, 0)
    kill_b(2)  # after the sweep
    got = fresh.get([8, 9, 10])
    assert pb.is_dir() and leftovers() == [] and (fresh.hits, fresh.misses) == (2, 0)
    assert all(torch.equal(x, y) for x, y in zip(got.keys + got.values, b.keys + b.values))
    fresh.get(CHUNK)
    fresh.prefix()
    assert swept == [store.directory]  # once per directory, not per lookup

    def no_lock(path, *a, **k):
        raise RuntimeError(f"a hit took the lock of {path}")

    with monkeypatch.context() as m:
        m.setattr(CS, "path_lock", no_lock)
        reader = ChunkStore(tmp_path, model)
        assert reader.get(CHUNK).surprisal is not None and reader.get(CHUNK, need_surprisal=True).token_ids == CHUNK
        assert reader.hits == 2
    with _read_only(monkeypatch, errno.EROFS):
        ro = ChunkStore(tmp_path, model)
        ro.get(CHUNK)  # the directory is swept now
        kill_b(3)
        with pytest.raises(CacheFormatError, match="is missing or not a directory"):
            ro.get([8, 9, 10])
        assert not pb.exists() and leftovers() == [f".{pb.name}.old-3-0000dead"]


def test_other_lock_errors_propagate(model, tmp_path, monkeypatch):
    with _read_only(monkeypatch, errno.ENOSPC), pytest.raises(OSError, match="refused"):
        ChunkStore(tmp_path, model).get(CHUNK)


def test_store_root_rules(tmp_path):
    assert check_store_root(tmp_path / "new") == tmp_path / "new"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_store_root(empty) == empty and not is_store_root(empty)  # empty: allowed, but not a store yet
    laid_out = tmp_path / "laid"
    (laid_out / ("ab" * 8)).mkdir(parents=True)
    for name in ("precompute_summary.json", ".x.lock", ".y.tmp-1"):
        (laid_out / name).write_text("")
    assert is_store_root(laid_out)
    for foreign in ("ab" * 7, "AB" * 8, "x.lock", ".x.lck"):
        d = tmp_path / f"foreign-{foreign}"
        (d / ("ab" * 8)).mkdir(parents=True)
        (d / foreign).mkdir()
        assert not is_store_root(d), foreign
    marked = tmp_path / "marked"
    marked.mkdir()
    (marked / "store.json").write_text(json.dumps({"kind": "kvpress_ext.a3_chunk_store", "format": 2}))
    (marked / "notes.txt").write_text("mine")
    assert is_store_root(marked) and check_store_root(marked) == marked
    (marked / "store.json").write_text(json.dumps({"kind": "other"}))
    assert not is_store_root(marked)
    (marked / "store.json").write_text("[1]")
    assert not is_store_root(marked)
    with pytest.raises(OutputPathError, match=r"^--store .*marked is a directory that is not a kvpress-ext chunk store "
                                              r"\(no store.json\); pass a new or empty directory \(nothing was written\)$"):
        check_store_root(marked)
    f = tmp_path / "file"
    f.write_text("x")
    assert not is_store_root(f)
    with pytest.raises(OutputPathError, match=r"^X .*file is a file, not a kvpress-ext chunk store \(a directory\); "
                                              r"pass a new directory or an existing store$"):
        check_store_root(f, flag="X")
    with pytest.raises(OutputPathError, match=r"^--store .*file/sub: .*file is not a directory; pass a path inside a "
                                              r"directory$"):
        check_store_root(f / "sub")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputPathError, match=r"^--store .*link is a broken symbolic link; pass a directory for the "
                                              r"chunk store$"):
        check_store_root(link)
    good_link = tmp_path / "goodlink"
    good_link.symlink_to(laid_out)
    assert not is_store_root(good_link)


def test_root_taken_over_before_the_first_write_is_left_alone(model, tmp_path):
    """The root is checked again when the first entry is written: a file that appeared since the store was opened
    makes it foreign, and nothing is written."""
    root = tmp_path / "store"
    root.mkdir()
    store = ChunkStore(root, model)
    (root / "notes.txt").write_text("mine")
    with pytest.raises(OutputPathError, match=r"^ChunkStore root .*store is a directory that is not a kvpress-ext "
                                              r"chunk store \(no store\.json\)"):
        store.get(CHUNK)
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt"]


def test_opening_a_store_on_a_foreign_path_names_the_store_root(model, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match=r"^ChunkStore root .*file is a file, not a kvpress-ext chunk store"):
        ChunkStore(tmp_path / "file", model)
