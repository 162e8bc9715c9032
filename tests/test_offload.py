"""Models split by accelerate (``load_model(device_map=...)``): with the middle decoder layers offloaded to disk
(their weights on the meta device until their forward), presses, positions, A³ fusion and cache save/load give
the outputs of the same model loaded whole. CPU only: the execution device is the CPU for every layer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from kvpress_ext.core.adapters import get_adapter
from kvpress_ext.core.apply import apply_press
from kvpress_ext.core.contract import compression_phases
from kvpress_ext.core.positions import position_state
from kvpress_ext.core.registry import get_press
from kvpress_ext.presses.a3 import A3Press, ChunkStore
from kvpress_ext.runtime.models import load_model
from kvpress_ext.storage.cache_files import load_cache, save_cache
from kvpress_ext.testing import middle_layers_on_disk, save_tiny_model

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KVPRESS_EXT_SHARED", REPO.parent / "shared"))
MODEL, TEXT = SHARED / "models" / "stories260k", SHARED / "data" / "tinystories_val.txt"
TOL = {"atol": 1e-6, "rtol": 1e-6}  # the same float32 computation on the same CPU, weights read back from disk
PRESSES = {
    "snapkv": lambda: get_press("snapkv", compression_ratio=0.5, window_size=8),
    "knorm": lambda: get_press("knorm", compression_ratio=0.5),
    "rkv": lambda: get_press("rkv", budget=16, window_size=4, compression_interval=4, rotate_keys=True),
    "lazy_streaming": lambda: get_press("lazy_streaming", cap_total=24, slack=4),
}


@pytest.fixture(scope="module", params=["llama", "gpt_neox", "llama+embeddings"])
def models(request, tmp_path_factory):
    arch, _, embeddings = request.param.partition("+")
    tmp = tmp_path_factory.mktemp(f"offload_{arch}")
    save_tiny_model(arch, tmp / "model", layers=4)
    whole, _ = load_model(str(tmp / "model"), device="cpu", attn_implementation="sdpa")
    split, _ = load_model(str(tmp / "model"), device_map=middle_layers_on_disk(whole, bool(embeddings)),
                          offload_folder=str(tmp / "offload"), attn_implementation="sdpa")
    layers = get_adapter(split).layers(split)
    assert all(p.device.type == "meta" for layer in layers[1:3] for p in layer.parameters())  # really offloaded
    assert all(p.device.type == "cpu" for p in layers[0].parameters())
    return whole, split, tmp


def _generate(model, press, ids, steps=12):
    """Logits of a prefill and ``steps`` greedy tokens under ``press`` (in the phases it compresses in)."""
    prefill, decoding = compression_phases(press)
    cache, logits = DynamicCache(), []
    with torch.no_grad():
        with apply_press(press if prefill else None, model):
            out = model(input_ids=ids, past_key_values=cache)
        logits.append(out.logits[0, -1])
        with apply_press(press if decoding else None, model):
            for _ in range(steps):
                out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache)
                logits.append(out.logits[0, -1])
    return torch.stack(logits), cache


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PRESSES))
def test_presses_and_positions_equal_the_whole_model(models, name):
    whole, split, _ = models
    ids = torch.randint(4, 120, (1, 40), generator=torch.Generator().manual_seed(0))
    ref_logits, ref_cache = _generate(whole, PRESSES[name](), ids)
    logits, cache = _generate(split, PRESSES[name](), ids)
    assert ref_cache.get_seq_length() < 40 + 12  # the press did compress
    torch.testing.assert_close(logits, ref_logits, **TOL)
    assert position_state(cache) == position_state(ref_cache)
    for a, b in zip(cache.layers, ref_cache.layers):
        torch.testing.assert_close(a.keys, b.keys, **TOL)
        torch.testing.assert_close(a.values, b.values, **TOL)


@pytest.mark.slow
def test_a3_fusion_and_eviction_equal_the_whole_model(models):
    whole, split, tmp = models
    chunks, question = [list(range(5, 19)), list(range(30, 47))], [60, 61, 62, 63]
    results = []
    for model, store in ((whole, "store_whole"), (split, "store_split")):
        press = A3Press(strategy="blend", rate=0.5, store=ChunkStore(tmp / store, model), evict="streaming_llm",
                        evict_kwargs={"compression_ratio": 0.25})
        results.append(press.fuse(model, chunks, question))
    (ref_cache, ref_logits), (cache, logits) = results
    torch.testing.assert_close(logits, ref_logits, **TOL)
    assert cache.get_seq_length() == ref_cache.get_seq_length() < 1 + 14 + 17 + 4  # eviction removed some
    for a, b in zip(cache.layers, ref_cache.layers):
        torch.testing.assert_close(a.keys, b.keys, **TOL)


@pytest.mark.slow
def test_cache_saved_and_loaded_with_an_offloaded_model_continues_the_same(models):
    whole, split, tmp = models
    ids = torch.randint(4, 120, (1, 30), generator=torch.Generator().manual_seed(1))
    _, cache = _generate(split, PRESSES["rkv"](), ids, steps=6)
    save_cache(cache, tmp / "saved", model=split, token_ids=ids[0].tolist())
    for model in (split, whole):  # a cache written from the split model loads into either
        loaded, _ = load_cache(tmp / "saved", model=model)
        assert position_state(loaded) == position_state(cache)
        with torch.no_grad():
            out = model(input_ids=torch.tensor([[7]]), past_key_values=loaded).logits
        if model is split:
            first = out
    torch.testing.assert_close(first, out, **TOL)


@pytest.mark.slow
def test_max_memory_offloads_the_rest_to_disk_and_perplexity_is_unchanged(tmp_path, capsys):
    from kvpress_ext.cli.perplexity import main
    common = ["--model", str(MODEL), "--dataset", "text", "--text_file", str(TEXT), "--max_eval_tokens", "200",
              "--context_limit", "128", "--chunk_size", "32", "--press", "knorm", "--ppl_apply_press", "--no_speed",
              "--num_threads", "1", "--no_progress"]
    assert main([*common, "--output_dir", str(tmp_path / "whole")]) == 0
    assert main([*common, "--output_dir", str(tmp_path / "split"), "--max_memory", "cpu=400KB",
                 "--offload_folder", str(tmp_path / "offload")]) == 0
    whole, split = (json.loads(next((tmp_path / d).glob("*knorm*.json")).read_text()) for d in ("whole", "split"))
    assert split["perplexity"]["ppl"] == pytest.approx(whole["perplexity"]["ppl"], rel=1e-6)
    assert split["cache"] == whole["cache"]
    assert whole["model"]["device_map"] is None
    assert "disk" in split["model"]["device_map"].values()  # accelerate did offload part of the model
    capsys.readouterr()
    assert main([*common, "--device", "cpu", "--device_map", "auto", "--output_dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device and --device_map exclude each other" in err[0]


def test_placement_flags_parse():
    from kvpress_ext.cli.common import parse_device_map, parse_max_memory
    from kvpress_ext.core.errors import KVPressExtError

    assert parse_max_memory(["0=20GiB", "cpu=60GiB"]) == {0: "20GiB", "cpu": "60GiB"}
    assert parse_device_map("auto") == "auto" and parse_device_map('{"model.layers.0": 1}') == {"model.layers.0": 1}
    with pytest.raises(KVPressExtError, match="DEVICE=SIZE"):
        parse_max_memory(["20GiB"])
    with pytest.raises(KVPressExtError, match="not valid JSON"):
        parse_device_map("{model: 1")
