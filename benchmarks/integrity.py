"""Cost of the integrity checks of saved caches: sha256 of the tensor file, the NaN/Inf scan, and the model
fingerprint, against loading without them.

    PYTHONPATH=$PWD python benchmarks/integrity.py --sizes_mb 4 32 128 --repeats 5 --json results/integrity.json

For each cache size (float32 K/V of 8 layers, 8 KV heads, head_dim 128) it saves one cache with
:func:`kvpress_ext.storage.cache_files.save_cache`, then times (median of ``--repeats``, file in the page cache):

* ``load_cache``: read + checksum + parse + NaN/Inf scan + DynamicCache (what every load does now);
* ``read+parse``: the same read and parse without the two checks (the floor of an in-memory load);
* ``unchecked load``: the load before this change (safetensors' memory-mapped ``load_file`` + DynamicCache);
* the checksum alone (xxh3_128, used when xxhash is installed, and sha256, the fallback) and the NaN/Inf scan
  alone (one ``aminmax`` per tensor, as used, and ``isfinite(t).all()`` for comparison), in ms per MB.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import xxhash
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file
from transformers import DynamicCache

from kvpress_ext.cli.common import command_entry
from kvpress_ext.testing import tiny_model

LAYERS, HEADS, HEAD_DIM = 8, 8, 128


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _cache(mb: float) -> DynamicCache:
    tokens = max(1, int(mb * 2**20 / (LAYERS * 2 * HEADS * HEAD_DIM * 4)))
    g = torch.Generator().manual_seed(0)
    cache = DynamicCache()
    for i in range(LAYERS):
        k = torch.randn(1, HEADS, tokens, HEAD_DIM, generator=g)
        cache.update(k, torch.randn(1, HEADS, tokens, HEAD_DIM, generator=g), i)
    return cache


def _unchecked_load(f: Path) -> DynamicCache:
    """What loading did before the checks: safetensors' memory-mapped load_file, then the DynamicCache."""
    tensors = load_file(str(f))
    cache = DynamicCache()
    for i in range(LAYERS):
        cache.update(tensors[f"layer{i}.keys"], tensors[f"layer{i}.values"], i)
    return cache


def measure_cache(mb: float, repeats: int, model) -> dict:
    from kvpress_ext.storage.cache_files import TENSORS_FILE, check_finite, load_cache, save_cache

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c"
        cache = _cache(mb)
        save_s = _median_s(lambda: save_cache(cache, path, model=model), repeats)
        f = path / TENSORS_FILE
        size_mb = f.stat().st_size / 2**20
        data = f.read_bytes()
        tensors = safetensors_load(data)
        row = {
            "file_mb": round(size_mb, 2),
            "save_cache_ms": save_s * 1e3,
            "load_cache_ms": _median_s(lambda: load_cache(path), repeats) * 1e3,
            "read_parse_ms": _median_s(lambda: safetensors_load(f.read_bytes()), repeats) * 1e3,
            "unchecked_load_ms": _median_s(lambda: _unchecked_load(f), repeats) * 1e3,
            "xxh3_128_ms": _median_s(lambda: xxhash.xxh3_128_digest(data), repeats) * 1e3,
            "sha256_ms": _median_s(lambda: hashlib.sha256(data).digest(), repeats) * 1e3,
            "finite_check_ms": _median_s(lambda: check_finite(tensors, "", ""), repeats) * 1e3,
            "isfinite_all_ms": _median_s(lambda: all(bool(torch.isfinite(t).all()) for t in tensors.values()),
                                         repeats) * 1e3,
        }
    for key in ("xxh3_128", "sha256", "finite_check", "isfinite_all"):
        row[f"{key}_ms_per_mb"] = row[f"{key}_ms"] / size_mb
    row["checks_overhead_ms"] = row["load_cache_ms"] - row["unchecked_load_ms"]
    return row


def measure_a3_entry(repeats: int, tokens: int = 128) -> dict:
    """Time of ``ChunkStore.get`` for a stored chunk (a hit: lock, metadata, checks, tensors) on stories260k.

    Uses only the ChunkStore API, so ``PYTHONPATH=<a checkout without the checks>`` measures the same thing there.
    """
    import os

    from transformers import AutoModelForCausalLM

    from kvpress_ext.presses.a3 import ChunkStore

    shared = Path(os.environ.get("KVPRESS_EXT_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
    model = AutoModelForCausalLM.from_pretrained(shared / "models" / "stories260k").eval()
    chunk = torch.randint(4, 500, (tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        store = ChunkStore(Path(tmp) / "store", model)
        store.get(chunk)
        size = sum(f.stat().st_size for f in store.chunk_path(chunk).iterdir())
        hit_ms = _median_s(lambda: store.get(chunk), repeats) * 1e3
    return {"model": "stories260k", "chunk_tokens": tokens, "entry_bytes": size, "get_hit_ms": hit_ms}


def measure_fingerprint(repeats: int) -> list[dict]:
    from kvpress_ext.storage.cache_files import model_fingerprint

    rows = []
    for name, kwargs in [("tiny llama (2 layers, hidden 64)", {"layers": 2}),
                         ("random llama (8 layers, hidden 1024)", {"layers": 8, "hidden": 1024, "heads": 16,
                                                                    "kv_heads": 4, "vocab_size": 32000})]:
        model = tiny_model("llama", **kwargs)
        params = sum(p.numel() for p in model.parameters())
        rows.append({"model": name, "parameters": params, "tensors": len(list(model.parameters())),
                     "fingerprint_ms": _median_s(lambda m=model: model_fingerprint(m), repeats) * 1e3})
    return rows


@command_entry("integrity")
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes_mb", type=float, nargs="+", default=[4, 32, 128])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    ap.add_argument("--a3_entry_only", action="store_true",
                    help="only time ChunkStore.get of a stored entry (works on checkouts without the checks)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    entry = measure_a3_entry(args.repeats)
    print(f"A3 chunk entry hit ({entry['chunk_tokens']} tokens of {entry['model']}, {entry['entry_bytes']:,} bytes): "
          f"ChunkStore.get {entry['get_hit_ms']:.3f} ms")
    if args.a3_entry_only:
        return 0
    model = tiny_model("llama", layers=2)
    caches = [measure_cache(mb, args.repeats, model) for mb in args.sizes_mb]
    fingerprints = measure_fingerprint(args.repeats)
    print("| file MB | save_cache ms | load_cache ms | read+parse ms | unchecked load ms | xxh3_128 ms/MB "
          "| sha256 ms/MB | aminmax finite check ms/MB | isfinite().all() ms/MB |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in caches:
        print(f"| {r['file_mb']:.1f} | {r['save_cache_ms']:.1f} | {r['load_cache_ms']:.1f} | {r['read_parse_ms']:.1f} "
              f"| {r['unchecked_load_ms']:.1f} | {r['xxh3_128_ms_per_mb']:.3f} | {r['sha256_ms_per_mb']:.3f} "
              f"| {r['finite_check_ms_per_mb']:.3f} | {r['isfinite_all_ms_per_mb']:.3f} |")
    print()
    for r in fingerprints:
        print(f"fingerprint of {r['model']} ({r['parameters']:,} parameters, {r['tensors']} tensors): "
              f"{r['fingerprint_ms']:.2f} ms")
    if args.json:
        from kvpress_ext.storage.safe_write import write_output

        record = {"command": "python benchmarks/integrity.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "date": str(date.today()), "machine": platform.processor() or platform.machine(),
                  "torch": torch.__version__, "threads": args.threads, "caches": caches, "fingerprints": fingerprints,
                  "a3_entry": entry}
        write_output(args.json, json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
