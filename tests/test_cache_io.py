"""Saved caches: identical continuation, clear errors for wrong model / corrupt / newer files, atomic writes."""

import copy
import json

import pytest
import torch
from transformers import DynamicCache

from kvpress_ext import cache_io
from kvpress_ext.apply import apply_press
from kvpress_ext.cache_io import atomic_directory_write, load_cache, save_cache
from kvpress_ext.errors import CacheFormatError
from kvpress_ext.positions import position_state
from kvpress_ext.presses.rkv import RKVPress
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
    with pytest.raises(CacheFormatError, match="truncated or corrupt"):
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


# --- the saved format, exactly (other code and older files depend on it) -------------------------------------
def test_metadata_and_tensor_files_hold_the_documented_fields(model, tmp_path, monkeypatch):
    from safetensors import safe_open

    from kvpress_ext.cache_io import model_fingerprint

    press = RKVPress(budget=16, window_size=4, compression_interval=4, rotate_keys=True)
    cache, ids = _filled_cache(model, press)
    monkeypatch.setattr(model.config, "_name_or_path", "tiny/llama")
    path = save_cache(cache, tmp_path / "a" / "b" / "c", model=model, token_ids=ids[0], press=press,
                      extra={"k": (1, 2)})  # parent directories are created
    meta = json.loads((path / cache_io.METADATA_FILE).read_text())
    n = cache.get_seq_length()
    state = position_state(cache)
    assert meta == {
        "format_version": 1, "num_layers": 2, "seq_lengths": [n, n],
        "positions": {"next_position": state.next_position, "seen_tokens": state.seen_tokens, "rotated": True},
        "press": cache_io.press_description(press), "token_ids": ids[0].tolist(), "model_name": "tiny/llama",
        "model_fingerprint": model_fingerprint(model), "dtype": "torch.float32", "extra": {"k": [1, 2]},
    }
    with safe_open(str(path / cache_io.TENSORS_FILE), "pt") as f:
        assert f.metadata() == {"format_version": "1"}
        assert sorted(f.keys()) == ["layer0.keys", "layer0.values", "layer1.keys", "layer1.values"]
        assert torch.equal(f.get_tensor("layer1.values"), cache.layers[1].values)


def test_cache_saved_without_model_or_layers(tmp_path):
    path = save_cache(DynamicCache(), tmp_path / "empty")
    cache, meta = load_cache(path)
    assert (meta["num_layers"], meta["seq_lengths"], meta["dtype"]) == (0, [], None)
    assert meta["model_name"] is None and meta["model_fingerprint"] is None and meta["press"] is None
    assert len(cache.layers) == 0


def test_press_description_is_json_safe_and_nested():
    from dataclasses import dataclass, field

    import kvpress

    from kvpress_ext.cache_io import press_description

    assert press_description(None) is None
    inner = kvpress.KnormPress(compression_ratio=0.25)
    described = press_description(kvpress.KeyRerotationPress(press=inner))
    assert described == {"name": "key_rerotation", "class": "KeyRerotationPress",
                         "params": {"press": {"name": "knorm", "class": "KnormPress",
                                              "params": {"compression_ratio": 0.25}}}}

    @dataclass
    class Odd:
        a: object = None
        hidden: int = field(default=3, init=False)  # not a constructor parameter: not recorded
        b: tuple = (1, "x")
        c: dict = field(default_factory=lambda: {1: torch.float16, "k": [None]})
        d: type = int
        e: object = torch.tensor([1.0])

    assert press_description(Odd()) == {"name": "Odd", "class": "Odd", "params": {
        "a": None, "b": [1, "x"], "c": {"1": "torch.float16", "k": [None]}, "d": "<class 'int'>",
        "e": "tensor([1.])"}}


def test_load_options_and_format_errors(model, tmp_path):
    from safetensors.torch import save_file

    cache, _ = _filled_cache(model, None)
    path = save_cache(cache, tmp_path / "c", model=model)
    loaded, _ = load_cache(path, model=model, device="cpu", dtype=torch.float16)
    assert loaded.layers[0].keys.dtype == loaded.layers[0].values.dtype == torch.float16
    torch.testing.assert_close(loaded.layers[0].values, cache.layers[0].values.half())
    assert load_cache(path)[0].layers[0].keys.dtype == torch.float32

    meta_file = path / cache_io.METADATA_FILE
    meta = json.loads(meta_file.read_text())
    n = meta["seq_lengths"][0]

    def fails(message):
        with pytest.raises(CacheFormatError) as err:
            load_cache(path)
        assert str(err.value) == message

    # a file without the position state (made by hand): positions follow the cache length
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "positions"}))
    assert position_state(load_cache(path)[0]).next_position == n
    meta_file.write_text(json.dumps({**meta, "seq_lengths": [n, n - 1]}))
    fails(f"Cache at {path}: layer 1 holds {n} keys and {n} values, metadata says {n - 1} tokens; the cache is "
          "corrupt: recompute it.")
    meta_file.write_text(json.dumps({**meta, "num_layers": 3, "seq_lengths": [n, n, n]}))
    fails(f"Cache at {path} misses tensor 'layer2.keys'; recompute it.")
    meta_file.write_text(json.dumps(meta))
    k, v = cache.layers[0].keys, cache.layers[0].values
    save_file({"layer0.keys": k.contiguous(), "layer0.values": v[:, :, :-1].contiguous(),
               "layer1.keys": k.clone(), "layer1.values": v.clone()}, str(path / cache_io.TENSORS_FILE))
    fails(f"Cache at {path}: layer 0 holds {n} keys and {n - 1} values, metadata says {n} tokens; the cache is "
          "corrupt: recompute it.")
    (path / cache_io.TENSORS_FILE).unlink()
    fails(f"Cache at {path} lacks tensors.safetensors; it is incomplete: recompute it.")
    meta_file.write_text("{not json")
    with pytest.raises(CacheFormatError, match=r"^.*metadata\.json is not valid JSON \(.*\); the cache is corrupt: "
                                               r"recompute it\.$"):
        load_cache(path)


def test_another_models_cache_message(model, tmp_path):
    from kvpress_ext.cache_io import model_fingerprint

    cache, _ = _filled_cache(model, None)
    model.config._name_or_path = "tiny/llama"
    try:
        path = save_cache(cache, tmp_path / "c", model=model)
    finally:
        model.config._name_or_path = ""
    other = tiny_model("qwen3")
    with pytest.raises(CacheFormatError) as err:
        load_cache(path, model=other)
    assert str(err.value) == (
        f"Cache at {path} was made with another model ('tiny/llama', fingerprint {model_fingerprint(model)}) than "
        f"the one given (fingerprint {model_fingerprint(other)}). Load it with the model that made it, or recompute it.")


def test_saving_an_unfilled_cache_is_refused(model, tmp_path):
    with pytest.raises(CacheFormatError) as err:
        save_cache(DynamicCache(config=model.config), tmp_path / "c")
    assert str(err.value) == "Layer 0 of the cache is empty; run a forward pass before saving it."


def test_model_fingerprint_recipe():
    """The fingerprint is stored in every saved cache: its recipe (sha256 of the sorted JSON of the layout
    fields, then of the first 4096 embedding weights as float32 when asked; 16 hex digits) must not drift, or
    every saved cache stops loading."""
    import hashlib

    from kvpress_ext.cache_io import _FINGERPRINT_KEYS, model_fingerprint

    def recipe(config_dict, weights=None):
        payload = {k: config_dict[k] for k in _FINGERPRINT_KEYS if k in config_dict}
        h = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode())
        if weights is not None:
            h.update(weights.flatten()[:4096].float().numpy().tobytes())
        return h.hexdigest()[:16]

    a, b = tiny_model("llama", seed=0, dtype=torch.bfloat16), tiny_model("llama", seed=1, dtype=torch.bfloat16)
    assert model_fingerprint(a) == model_fingerprint(b) == model_fingerprint(a.config) == recipe(a.config.to_dict())
    wa = a.get_input_embeddings().weight.detach()
    assert model_fingerprint(a, include_weights=True) == recipe(a.config.to_dict(), wa)
    assert model_fingerprint(a, include_weights=True) != model_fingerprint(b, include_weights=True)
    assert model_fingerprint(a.config, include_weights=True) == model_fingerprint(a.config)  # no weights to hash
    plain = {"num_hidden_layers": 2, "model_type": "llama", "rope_parameters": {"dtype": torch.float16}, "x": 1}
    assert model_fingerprint(plain) == recipe(plain)


def test_atomic_write_replaces_an_existing_directory_through_siblings(tmp_path, monkeypatch):
    """Temporary and old copies live beside the target (same filesystem: the renames are atomic) and are gone
    afterwards; a failure to delete them neither fails the write nor hides the write's own error."""
    import tempfile

    made = []
    real_mkdtemp = tempfile.mkdtemp

    def recording_mkdtemp(prefix=None, dir=None):
        made.append((prefix, dir))
        return real_mkdtemp(prefix=prefix, dir=dir)

    monkeypatch.setattr(cache_io.tempfile, "mkdtemp", recording_mkdtemp)
    target = tmp_path / "c"
    atomic_directory_write(target, lambda d: (d / "v").write_text("1"))
    atomic_directory_write(target, lambda d: (d / "v").write_text("2"))
    assert (target / "v").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    assert made == [(".c.tmp-", tmp_path), (".c.tmp-", tmp_path), (".c.old-", tmp_path)]

    real_rmtree = cache_io.shutil.rmtree

    def undeletable(path, ignore_errors=False):  # e.g. a file still open elsewhere
        if not ignore_errors:
            raise OSError("cannot delete (simulated)")

    monkeypatch.setattr(cache_io.shutil, "rmtree", undeletable)
    atomic_directory_write(target, lambda d: (d / "v").write_text("3"))
    assert (target / "v").read_text() == "3"

    def failing(d):
        raise RuntimeError("write failed")

    with pytest.raises(RuntimeError, match="write failed"):
        atomic_directory_write(target, failing)
    monkeypatch.setattr(cache_io.shutil, "rmtree", real_rmtree)
