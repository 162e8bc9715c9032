"""What save_cache writes and what load_cache checks (storage/cache_files.py): the whole one-line messages (where,
what, fix), the metadata written, the safetensors parser's edges, which directories count as ours, short reads,
``device``/``dtype`` on load, and the JSON-safe description of presses and extra fields."""

from __future__ import annotations

import builtins
import dataclasses
import errno
import json
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save, save_file
from transformers import DynamicCache

from kvpress_ext.core.apply import apply_press
from kvpress_ext.core.errors import CacheFormatError
from kvpress_ext.presses.rkv import RKVPress
from kvpress_ext.storage import cache_files as cache_io
from kvpress_ext.storage.cache_files import (
    check_cache_target,
    check_fields,
    check_finite,
    check_version,
    checksum_bytes,
    file_checksum,
    is_our_cache_dir,
    load_cache,
    press_description,
    read_json_object,
    read_metadata,
    read_verified_tensors,
    save_cache,
)
from kvpress_ext.storage.safe_write import OutputPathError
from kvpress_ext.testing import tiny_model


@pytest.fixture(scope="module")
def model():
    m = tiny_model("llama")
    m.config._name_or_path = "tiny/llama-for-tests"
    return m


def _cache(model, n=12):
    ids = torch.randint(4, 120, (1, n), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache()
    with apply_press(None, model), torch.no_grad():
        model(input_ids=ids, past_key_values=cache)
    return cache


@pytest.fixture
def saved(model, tmp_path):
    return save_cache(_cache(model), tmp_path / "c", model=model)


def _fix(path):
    return f"recompute it (`kvpress-ext icl precompute --out {path} --recompute ...`)"


def _meta(path):
    return json.loads((path / "metadata.json").read_text())


def _write_meta(path, meta):
    (path / "metadata.json").write_text(json.dumps(meta))


def _rewrite_tensors(path, tensors):
    save_file(tensors, str(path / "tensors.safetensors"))
    meta = _meta(path)
    meta["checksums"]["tensors.safetensors"] = file_checksum(path / "tensors.safetensors")
    _write_meta(path, meta)


# --- saving ------------------------------------------------------------------------------------------------------
def test_saved_metadata_and_file_header(model, tmp_path):
    press = RKVPress(budget=16, window_size=4)
    path = save_cache(_cache(model), tmp_path / "c", model=model, press=press)
    meta = _meta(path)
    assert meta["model_name"] == "tiny/llama-for-tests" and meta["dtype"] == "torch.float32"
    assert meta["press"] == press_description(press)
    assert meta["press"]["name"] == "rkv" and meta["press"]["class"] == "RKVPress"
    assert meta["press"]["params"]["budget"] == 16 and "compression_phases" not in meta["press"]["params"]  # init only
    with safe_open(str(path / "tensors.safetensors"), "pt") as f:
        assert f.metadata() == {"format_version": "2"}


def test_save_errors_are_whole_sentences(model, tmp_path):
    with pytest.raises(CacheFormatError) as err:
        save_cache(_cache(model), tmp_path / "a")
    assert str(err.value) == ("save_cache needs the model that made the cache (model=...): its fingerprint is saved so "
                              "the cache is never loaded into another model.")
    with pytest.raises(CacheFormatError) as err:
        save_cache(DynamicCache(), tmp_path / "b", model=model)
    assert str(err.value) == "The cache has no layers; run a forward pass before saving it."
    with pytest.raises(CacheFormatError) as err:
        save_cache(DynamicCache(config=model.config), tmp_path / "b", model=model)
    assert str(err.value) == "Layer 0 of the cache is empty; run a forward pass before saving it."
    cache = _cache(model)
    cache.layers[1].values[0, 0, 0, 0] = float("inf")
    with pytest.raises(CacheFormatError) as err:
        save_cache(cache, tmp_path / "b", model=model)
    assert str(err.value) == ("The cache to save: tensor layer1.values holds NaN or Inf values; not saved: the model "
                              "produced them (check the dtype and inputs)")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --- JSON-safe descriptions ----------------------------------------------------------------------------------------
class _Opaque:
    def __repr__(self):
        return "<opaque>"


@dataclasses.dataclass
class _Inner:
    x: int = 1


@dataclasses.dataclass
class _Outer:
    inner: object = None
    hidden: int = dataclasses.field(default=5, init=False)  # not a parameter: left out, the fields after it kept
    items: tuple = (1, 2)


def test_descriptions_and_extra_fields_are_json(model, tmp_path):
    assert press_description(None) is None
    assert press_description(_Opaque()) == {"name": "_Opaque", "class": "_Opaque", "params": {}}
    outer = _Outer(inner=_Inner(3), items=((1, "a"), [None, 2.5]))
    assert press_description(outer) == {
        "name": "_Outer", "class": "_Outer",
        "params": {"inner": {"name": "_Inner", "class": "_Inner", "params": {"x": 3}}, "items": [[1, "a"], [None, 2.5]]},
    }
    extra = {"t": (1, (2, 3)), "obj": _Opaque(), "cls": _Inner, "dc": _Inner(7), 4: {"k": [True, None]}}
    path = save_cache(_cache(model), tmp_path / "c", model=model, extra=extra)
    assert load_cache(path, model=model)[1]["extra"] == {
        "t": [1, [2, 3]], "obj": "<opaque>", "cls": repr(_Inner),
        "dc": {"name": "_Inner", "class": "_Inner", "params": {"x": 7}}, "4": {"k": [True, None]},
    }


# --- loading: whole messages ---------------------------------------------------------------------------------------
def test_load_errors_name_the_cache_and_the_fix(model, saved, tmp_path):
    fix = _fix(saved)
    other = tiny_model("llama", seed=1)
    with pytest.raises(CacheFormatError) as err:
        load_cache(saved, model=other)
    from kvpress_ext.storage.cache_files import model_fingerprint

    assert str(err.value) == (
        f"Cache at {saved} was made with another model ('tiny/llama-for-tests', fingerprint "
        f"{model_fingerprint(model)}) than the one given (fingerprint {model_fingerprint(other)}). "
        "Load it with the model that made it, or recompute it.")

    f = saved / "tensors.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CacheFormatError) as err:
        load_cache(saved, model=model)
    assert str(err.value) == f"Cache at {saved}: tensors.safetensors does not match its checksum (corrupt or changed " \
                             f"on disk); {fix}"
    f.write_bytes(data)

    tensors = load_cache(saved)[0]
    t = {f"layer{i}.{k}": getattr(layer, k).clone() for i, layer in enumerate(tensors.layers) for k in ("keys", "values")}
    t["layer0.keys"][0, 0, 0, 0] = float("nan")
    _rewrite_tensors(saved, t)
    with pytest.raises(CacheFormatError) as err:
        load_cache(saved, model=model)
    assert str(err.value) == f"Cache at {saved}: tensor layer0.keys holds NaN or Inf values; {fix}"

    t["layer0.keys"][0, 0, 0, 0] = 0.0
    good_values = t["layer0.values"]
    t["layer0.values"] = good_values[:, :1]  # other heads than the keys
    _rewrite_tensors(saved, t)
    with pytest.raises(CacheFormatError) as err:
        load_cache(saved)
    shape = tuple(t["layer0.keys"].shape)
    assert str(err.value) == (f"Cache at {saved}: layer 0 holds tensors of shape {shape} / {tuple(t['layer0.values'].shape)}, "
                              f"not (batch, heads, tokens, head_dim) each; {fix}")
    t["layer0.keys"], t["layer0.values"] = t["layer0.keys"][0], good_values[0]  # 3-D, of the right length
    _rewrite_tensors(saved, t)
    with pytest.raises(CacheFormatError, match="layer 0 holds tensors of shape"):
        load_cache(saved)

    (saved / "tensors.safetensors").unlink()
    with pytest.raises(CacheFormatError) as err:
        load_cache(saved)
    assert str(err.value) == f"Cache at {saved} lacks tensors.safetensors; it is incomplete: {fix}"


def test_metadata_errors_name_the_cache_and_the_fix(saved, tmp_path):
    fix = _fix(saved)
    meta = _meta(saved)
    bad = dict(meta, seq_lengths=meta["seq_lengths"][:1])
    _write_meta(saved, bad)
    with pytest.raises(CacheFormatError) as err:
        read_metadata(saved)
    assert str(err.value) == f"Cache at {saved}: metadata.json lists 1 layer lengths for 2 layers; {fix}"
    for key, value in (("seq_lengths", [12.5, 12]), ("num_layers", True), ("token_ids", [1, -1])):
        _write_meta(saved, dict(meta, **{key: value}))
        with pytest.raises(CacheFormatError) as err:
            read_metadata(saved)
        assert str(err.value) == f"Cache at {saved}: metadata.json is not valid (invalid {key}); {fix}"
    _write_meta(saved, dict(meta, format_version=7))
    with pytest.raises(CacheFormatError) as err:
        read_metadata(saved)
    assert str(err.value) == (f"Cache at {saved} has format version 7, newer than this kvpress_ext understands (2); "
                              f"upgrade kvpress-ext, or {fix}")
    (saved / "metadata.json").write_text("{" + "\n" * 200000 + "x")
    with pytest.raises(CacheFormatError) as err:
        read_metadata(saved)
    try:
        json.loads((saved / "metadata.json").read_bytes())
    except ValueError as exc:
        parser_message = str(exc)
    assert len(parser_message) > 80
    assert str(err.value) == f"Cache at {saved}: metadata.json is not valid JSON ({parser_message[:80]}); {fix}"
    (tmp_path / "file").write_text("x")
    with pytest.raises(CacheFormatError) as err:
        read_metadata(tmp_path / "file")
    assert str(err.value) == f"{tmp_path / 'file'} is a file, not a saved cache (a directory); pass the cache directory."


def test_field_and_version_messages():
    schema = {"a": lambda v: v == 1, "b": lambda v: v == 2, "c": lambda v: True, "d": lambda v: True}
    with pytest.raises(CacheFormatError) as err:
        check_fields({"a": 0, "b": 0, "x": 1, "y": 2}, schema, "W", "F")
    assert str(err.value) == "W: metadata.json is not valid (missing c, d; unexpected x, y; invalid a, b); F"
    with pytest.raises(CacheFormatError) as err:
        check_version(0, (2, 3), "W", "F")
    assert str(err.value) == "W has unknown format version 0 (this kvpress_ext reads 2, 3); F"
    with pytest.raises(CacheFormatError) as err:
        check_version(1, (2, 3), "W", "F")
    assert str(err.value) == "W has format version 1, older than this kvpress_ext reads (2, 3); F"
    with pytest.raises(CacheFormatError) as err:
        check_version(4, (2, 3), "W", "F")
    assert str(err.value) == "W has format version 4, newer than this kvpress_ext understands (3); upgrade kvpress-ext, or F"
    assert check_version(3, (2, 3), "W", "F") == 3


def test_json_object_messages(tmp_path):
    with pytest.raises(CacheFormatError) as err:
        read_json_object(tmp_path / "missing.json", "W", "F")
    assert str(err.value) == "W: missing.json is missing; F"
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(CacheFormatError) as err:
        read_json_object(tmp_path / "dir.json", "W", "F")
    assert str(err.value) == "W: cannot read dir.json (Is a directory); F"


# --- finite check ----------------------------------------------------------------------------------------------
def test_finite_check_skips_integers_and_empty_tensors_and_sees_single_values():
    check_finite({"ints": torch.arange(3), "flags": torch.tensor([True]), "empty": torch.zeros(0, 2),
                  "ok": torch.ones(2)}, "W", "F")
    with pytest.raises(CacheFormatError) as err:
        check_finite({"ints": torch.arange(3), "one": torch.tensor([float("nan")])}, "W", "F")
    assert str(err.value) == "W: tensor one holds NaN or Inf values; F"


# --- checksums and reading -----------------------------------------------------------------------------------------
def test_checksum_algorithms(monkeypatch):
    import hashlib

    with pytest.raises(ValueError, match="md5"):
        checksum_bytes(b"x", "md5")
    monkeypatch.setitem(sys.modules, "xxhash", None)  # not installed: sha256
    assert cache_io._default_algorithm() == "sha256"
    assert checksum_bytes(b"abc") == "sha256:" + hashlib.sha256(b"abc").hexdigest()


def test_checksum_with_a_second_colon_is_a_mismatch(saved):
    meta = _meta(saved)
    meta["checksums"]["tensors.safetensors"] = "sha256:" + "0" * 64 + ":x"
    _write_meta(saved, meta)
    with pytest.raises(CacheFormatError, match="does not match its checksum"):
        load_cache(saved)


def test_read_verified_tensors_edges(saved, monkeypatch):
    f = saved / "tensors.safetensors"
    expected = _meta(saved)["checksums"]["tensors.safetensors"]
    with pytest.raises(CacheFormatError) as err:
        read_verified_tensors(f, "md5:" + "0" * 32, "W", "F")
    assert str(err.value) == "W: checksum algorithm 'md5' is unknown here; F"
    on_cpu = read_verified_tensors(f, expected, "W", "F", device="cpu")
    plain = read_verified_tensors(f, expected, "W", "F")
    assert on_cpu.keys() == plain.keys() and all(torch.equal(on_cpu[k], plain[k]) for k in plain)

    real_open = builtins.open

    class Short:
        """A file that hands out at most 1000 bytes per read (as pipes and network file systems may)."""

        def __init__(self, fh, stop=None):
            self.fh, self.stop, self.given = fh, stop, 0

        def fileno(self):
            return self.fh.fileno()

        def readinto(self, view):
            if self.stop is not None and self.given >= self.stop:
                return 0
            n = self.fh.readinto(view[:1000])
            self.given += n
            return n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(cache_io, "open", lambda p, mode: Short(real_open(p, mode)), raising=False)
    short = read_verified_tensors(f, expected, "W", "F")
    assert all(torch.equal(short[k], plain[k]) for k in plain)
    monkeypatch.setattr(cache_io, "open", lambda p, mode: Short(real_open(p, mode), stop=3000), raising=False)
    with pytest.raises(CacheFormatError) as err:
        read_verified_tensors(f, expected, "W", "F")
    assert str(err.value) == "W: tensors.safetensors changed while it was read; F"

    def failing(p, mode):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(cache_io, "open", failing, raising=False)
    with pytest.raises(CacheFormatError) as err:
        read_verified_tensors(f, expected, "W", "F")
    assert str(err.value) == "W: cannot read tensors.safetensors (Input/output error); F"


def test_load_to_device_and_dtype(model, saved):
    # "meta" stands for a device other than the one the file is read to (the CPU)
    on_meta, _ = load_cache(saved, device="meta")
    assert {t.device.type for layer in on_meta.layers for t in (layer.keys, layer.values)} == {"meta"}
    expected = _meta(saved)["checksums"]["tensors.safetensors"]
    tensors = read_verified_tensors(saved / "tensors.safetensors", expected, "W", "F", device="meta")
    assert {t.device.type for t in tensors.values()} == {"meta"}
    cache, _ = load_cache(saved, device="cpu")
    half, _ = load_cache(saved, model=model, dtype=torch.float16)
    both, _ = load_cache(saved, device="cpu", dtype=torch.bfloat16)
    assert half.layers[0].keys.dtype == half.layers[1].values.dtype == torch.float16
    assert both.layers[1].keys.dtype == both.layers[0].values.dtype == torch.bfloat16
    torch.testing.assert_close(half.layers[1].keys.float(), cache.layers[1].keys, atol=1e-2, rtol=1e-2)


# --- the safetensors parser ----------------------------------------------------------------------------------------
def _file(header: dict, data: bytes = b"") -> bytearray:
    h = json.dumps(header).encode()
    return bytearray(len(h).to_bytes(8, "little") + h + data)


@pytest.mark.parametrize(("buf", "message"), [
    (bytearray(b"\x00" * 5), "shorter than the 8-byte header length"),
    (bytearray(b"\x00" * 8), "header is not JSON"),  # an empty header
    (bytearray((3).to_bytes(8, "little") + b"{}"), "header length beyond the end of the file"),
    (bytearray((2).to_bytes(8, "little") + b"[]"), "header is not a JSON object"),
    (bytearray((2).to_bytes(8, "little") + b"{x"), "header is not JSON"),
    (_file({"t": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
     "tensor 't' has an unknown dtype or a malformed entry"),
    (_file({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),
     "tensor 't' lies outside the data or disagrees with its shape"),
    (_file({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8),
     "tensor 't' lies outside the data or disagrees with its shape"),
    (_file({"t": {"dtype": "F32", "shape": [-1, -2], "data_offsets": [0, 8]}}, b"\0" * 8),
     "tensor 't' lies outside the data or disagrees with its shape"),
    (_file({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 8),
     "tensor 't' lies outside the data or disagrees with its shape"),
])
def test_parser_refuses_malformed_files_with_its_reason(buf, message):
    with pytest.raises(ValueError) as err:
        cache_io._parse_safetensors(buf)
    assert str(err.value) == message


def test_parser_edges_that_are_valid():
    assert cache_io._parse_safetensors(bytearray((2).to_bytes(8, "little") + b"{}")) == {}  # no tensors, no data
    tensors = {"empty_ints": torch.zeros(0, 3, dtype=torch.int64), "empty_half": torch.zeros(2, 0, dtype=torch.float16),
               "x": torch.arange(4, dtype=torch.int32)}
    parsed = cache_io._parse_safetensors(bytearray(save(tensors)))
    for k, t in tensors.items():
        assert parsed[k].dtype == t.dtype and parsed[k].shape == t.shape and torch.equal(parsed[k], t)


# --- whose directory is it -----------------------------------------------------------------------------------------
def test_which_directories_are_ours(saved, tmp_path):
    assert is_our_cache_dir(saved)
    (saved / "notes.txt").write_text("a user's file beside our files: still ours by its metadata")
    assert is_our_cache_dir(saved)
    link = tmp_path / "link"
    link.symlink_to(saved, target_is_directory=True)
    assert not is_our_cache_dir(link)
    assert not is_our_cache_dir(saved / "notes.txt")
    cases = {
        "kind_only": {"kind": "kvpress_ext.kv_cache"},
        "old_style": {"format_version": 1, "seq_lengths": [3]},
        "other_kind": {"kind": "something else"},
        "half_old": {"format_version": 1},
        "list": [1, 2],
    }
    for name, meta in cases.items():
        d = tmp_path / name
        d.mkdir()
        (d / "metadata.json").write_text(json.dumps(meta))
        (d / "other.txt").write_text("x")
    assert is_our_cache_dir(tmp_path / "kind_only") and is_our_cache_dir(tmp_path / "old_style")
    for name in ("other_kind", "half_old", "list"):
        assert not is_our_cache_dir(tmp_path / name), name
    (tmp_path / "empty").mkdir()
    assert not is_our_cache_dir(tmp_path / "empty")


def test_cache_target_messages(saved, tmp_path):
    (tmp_path / "link").symlink_to(saved, target_is_directory=True)
    with pytest.raises(OutputPathError) as err:
        check_cache_target(tmp_path / "link")
    assert str(err.value) == f"--out {tmp_path / 'link'} is a symbolic link; pass a new directory path for the cache"
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError) as err:
        check_cache_target(tmp_path / "file" / "sub")
    assert str(err.value) == (f"--out {tmp_path / 'file' / 'sub'}: {tmp_path / 'file'} is not a directory; "
                              "pass a path inside a directory")
    with pytest.raises(OutputPathError) as err:
        check_cache_target(tmp_path / "file")
    assert str(err.value) == (f"--out {tmp_path / 'file'} is an existing file, not a kvpress-ext cache; pass a new "
                              "directory path (nothing was written)")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "a.txt").write_text("x")
    with pytest.raises(OutputPathError) as err:
        check_cache_target(tmp_path / "theirs", flag="--cache")
    assert str(err.value) == (f"--cache {tmp_path / 'theirs'} is a directory that is not a kvpress-ext cache; pass a "
                              "new or empty directory (nothing was written)")
    assert check_cache_target(saved) == saved and check_cache_target(tmp_path / "new" / "dir") == tmp_path / "new" / "dir"
