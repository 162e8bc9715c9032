"""Saved caches: identical continuation, clear errors for wrong model / corrupt / newer files, atomic writes."""

import copy
import json

import pytest
import torch
from transformers import DynamicCache

from kvpress_ext.core.apply import apply_press
from kvpress_ext.core.errors import CacheFormatError
from kvpress_ext.core.positions import position_state
from kvpress_ext.presses.rkv import RKVPress
from kvpress_ext.storage import cache_files as cache_io
from kvpress_ext.storage.cache_files import atomic_directory_write, load_cache, save_cache
from kvpress_ext.testing import tiny_model


def _continue(model, cache, first, steps):
    logits = []
    tok = first
    with apply_press(None, model), torch.no_grad():
        for _ in range(steps):
            out = model(input_ids=tok, past_key_values=cache)
            logits.append(out.logits[:, -1])
            tok = out.logits[:, -1:].argmax(-1)
    return torch.cat(logits)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _filled_cache(model, press):
    ids = torch.randint(4, 120, (1, 30), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache()
    with apply_press(press, model), torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache)
        for _ in range(6):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache)
    return cache, ids


@pytest.mark.parametrize("press", [None, RKVPress(budget=16, window_size=4, compression_interval=4, rotate_keys=True,
                                                  initial_non_compressible_length=2, rotation_offset=3)])
def test_saved_cache_continues_with_identical_logits(model, press, tmp_path):
    cache, ids = _filled_cache(model, press)
    state = copy.copy(position_state(cache))
    if press is not None:
        assert state.rotated and state.next_position != state.seen_tokens  # rotation moved positions
    save_cache(cache, tmp_path / "c", model=model, token_ids=ids[0].tolist(), press=press, extra={"note": "x"})
    loaded, meta = load_cache(tmp_path / "c", model=model)
    assert position_state(loaded) == state
    assert meta["extra"] == {"note": "x"} and meta["token_ids"] == ids[0].tolist()
    first = torch.tensor([[7]])
    expected = _continue(model, copy.deepcopy(cache), first, 5)
    assert torch.equal(_continue(model, loaded, first, 5), expected)


def test_loading_into_another_model_fails(model, tmp_path):
    cache, _ = _filled_cache(model, None)
    save_cache(cache, tmp_path / "c", model=model)
    with pytest.raises(CacheFormatError, match="another model"):
        load_cache(tmp_path / "c", model=tiny_model("qwen3"))


def test_truncated_tensor_file_fails(model, tmp_path):
    cache, _ = _filled_cache(model, None)
    path = save_cache(cache, tmp_path / "c", model=model)
    f = path / cache_io.TENSORS_FILE
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CacheFormatError, match="does not match its checksum"):
        load_cache(path, model=model)


def test_newer_format_version_fails(model, tmp_path):
    cache, _ = _filled_cache(model, None)
    path = save_cache(cache, tmp_path / "c", model=model)
    meta = json.loads((path / cache_io.METADATA_FILE).read_text())
    meta["format_version"] = cache_io.FORMAT_VERSION + 1
    (path / cache_io.METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(CacheFormatError, match="newer"):
        load_cache(path, model=model)


def test_missing_cache_dir_fails(tmp_path):
    with pytest.raises(CacheFormatError, match="No saved cache"):
        load_cache(tmp_path / "nothing")


def test_crash_during_write_keeps_previous_cache(model, tmp_path, monkeypatch):
    cache, _ = _filled_cache(model, None)
    path = save_cache(cache, tmp_path / "c", model=model, extra={"version": 1})
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def crashing_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(cache_io, "save_file", crashing_save_file)
    with pytest.raises(OSError, match="simulated"):
        save_cache(cache, path, model=model, extra={"version": 2})
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no partial or temporary directory left
    assert load_cache(path, model=model)[1]["extra"] == {"version": 1}

    # a crash on a first write leaves nothing at all
    def half_write(d):
        (d / "a").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_directory_write(tmp_path / "new", half_write)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_in_place_safetensors_parser_matches_the_library(tmp_path):
    """``_parse_safetensors`` (zero-copy views of the file's bytes) reads what safetensors wrote, every dtype."""
    from safetensors.torch import load, save

    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(2, 3, 5, generator=g), "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "f16": torch.randn(3, 1, generator=g).half(), "f64": torch.randn(4, generator=g).double(),
        "i64": torch.arange(5), "i32": torch.arange(3, dtype=torch.int32), "u8": torch.arange(9, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4), "scalar": torch.tensor(3.5),
    }
    data = save(tensors, metadata={"format_version": "2"})
    parsed = cache_io._parse_safetensors(bytearray(data))
    reference = load(data)
    assert parsed.keys() == reference.keys() == tensors.keys()
    for name, t in tensors.items():
        assert parsed[name].dtype == t.dtype and torch.equal(parsed[name], t) and torch.equal(parsed[name], reference[name])
    header_len = int.from_bytes(data[:8], "little")
    for bad in (data[:5], (10**9).to_bytes(8, "little") + data[8:], data[:8] + b"[" + data[9:],
                data[: 8 + header_len] + data[8 + header_len : -3]):
        with pytest.raises(ValueError):
            cache_io._parse_safetensors(bytearray(bad))
