"""Correctness on a CUDA device: the checks CI (CPU only) cannot run.

    PYTHONPATH=$PWD python benchmarks/gpu_checks.py --json results/gpu_checks.json

Why: every test in tests/ runs on the CPU, where ``.to(x.device)`` is a no-op and a tensor built on the default
device lands where the model is anyway. On a GPU those mistakes either crash or silently mix devices. Each check
compares against a reference with a stated tolerance, for every architecture's tiny random model
(:mod:`kvpress_ext.testing`) moved to the GPU (float32, TF32 off, so CPU and GPU differ only by summation order):

* ``gpu_matches_cpu``: question logits after a prefill under each press, GPU against CPU (max |diff| <= 1e-3,
  same cache length);
* ``ratio_zero``: each press at ratio 0 on the GPU reproduces the uncompressed GPU logits exactly;
* ``rerotation``: keys re-rotated from one set of positions to another equal the keys computed at the new
  positions (0-4000; float32 <= 1e-3, bfloat16 <= 5e-2), and stay on the GPU;
* ``cache_roundtrip``: a cache saved from the GPU and loaded back (onto the GPU, the layers' device) gives
  identical logits;
* ``a3_full_recompute``: A³ fusion at rate 1.0 on the GPU equals a full prefill (<= 1e-4).

Exit status 1 when any check fails; 2 when there is no CUDA device.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
from transformers import DynamicCache

from kvpress_ext import apply_press, compression_phases, get_adapter, get_press
from kvpress_ext.cli.common import command_entry
from kvpress_ext.core.errors import NoCompressionWarning
from kvpress_ext.presses.a3 import A3Press, ChunkStore
from kvpress_ext.storage.cache_files import load_cache, save_cache
from kvpress_ext.storage.safe_write import write_output
from kvpress_ext.testing import ARCHITECTURES, tiny_model

CONTEXT = 48
#: where the checks run: cuda (``--device cpu`` only dry-runs the script itself; it proves nothing about GPUs)
DEVICE = "cuda"
#: (press name, parameters that compress, parameters that remove nothing)
PRESSES = [
    ("knorm", {"compression_ratio": 0.5}, {"compression_ratio": 0.0}),
    ("snapkv", {"compression_ratio": 0.5, "window_size": 8}, {"compression_ratio": 0.0, "window_size": 8}),
    ("streaming_llm", {"compression_ratio": 0.5}, {"compression_ratio": 0.0}),
    ("expected_attention", {"compression_ratio": 0.5}, {"compression_ratio": 0.0}),
    ("tova", {"compression_ratio": 0.5}, {"compression_ratio": 0.0}),
    ("rkv", {"budget": CONTEXT // 2, "window_size": 4, "compression_interval": 8},
     {"budget": 10_000, "window_size": 4, "compression_interval": 8}),
    ("lazy_streaming", {"cap_total": CONTEXT // 2, "slack": 4}, {"window": 10_000, "slack": 0}),
]


def on_device(t: torch.Tensor) -> bool:
    return t.device.type == torch.device(DEVICE).type


def question_logits(model, press, ids, question):
    """Prefill ``ids`` under ``press`` (its prefill phase), then the logits of the question tokens."""
    cache = DynamicCache()
    prefill, _ = compression_phases(press) if press is not None else (False, False)
    with torch.no_grad():
        with apply_press(press if prefill else None, model):
            get_adapter(model).decoder(model)(input_ids=ids, past_key_values=cache)
        logits = model(input_ids=question, past_key_values=cache).logits
    return logits, cache.get_seq_length(), cache


def _ids(n, seed, device):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 100, (1, n), generator=g).to(device)


def check_presses(arch, results):
    cpu_model = tiny_model(arch)
    gpu_model = tiny_model(arch).to(DEVICE)
    ids, question = _ids(CONTEXT, 0, "cpu"), _ids(4, 1, "cpu")
    ref_gpu, ref_len, _ = question_logits(gpu_model, None, ids.to(DEVICE), question.to(DEVICE))
    for name, kwargs, noop in PRESSES:
        cpu_logits, cpu_len, _ = question_logits(cpu_model, get_press(name, **kwargs), ids, question)
        gpu_logits, gpu_len, _ = question_logits(gpu_model, get_press(name, **kwargs), ids.to(DEVICE), question.to(DEVICE))
        diff = (gpu_logits.cpu() - cpu_logits).abs().max().item()
        results.append({"check": "gpu_matches_cpu", "arch": arch, "press": name, "max_abs_diff": diff,
                        "cache_cpu": cpu_len, "cache_gpu": gpu_len, "tolerance": 1e-3,
                        "ok": diff <= 1e-3 and cpu_len == gpu_len and on_device(gpu_logits)})
        with warnings.catch_warnings():  # compressing nothing is the point here
            warnings.simplefilter("ignore", NoCompressionWarning)
            noop_press = get_press(name, **noop)
        zero_logits, zero_len, _ = question_logits(gpu_model, noop_press, ids.to(DEVICE), question.to(DEVICE))
        diff0 = (zero_logits - ref_gpu).abs().max().item()
        results.append({"check": "ratio_zero", "arch": arch, "press": name, "max_abs_diff": diff0,
                        "cache": zero_len, "reference_cache": ref_len, "tolerance": 0.0,
                        "ok": diff0 == 0.0 and zero_len == ref_len})


def check_rerotation(arch, results):
    model = tiny_model(arch).to(DEVICE)
    adapter = get_adapter(model)
    shape = adapter.shape(model)
    g = torch.Generator().manual_seed(2)
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 5e-2)):  # positions up to 4000: float32 angles
        raw = torch.randn(1, shape.num_kv_heads, 40, shape.head_dim, generator=g).to(DEVICE, dtype)
        old = torch.arange(40, device=DEVICE)[None]
        new = torch.randint(0, 4000, (1, 40), generator=g).to(DEVICE)
        keys = adapter.apply_rope(model, raw, old)
        moved = adapter.rerotate_keys(model, keys, old, new)
        direct = adapter.apply_rope(model, raw, new)
        diff = (moved.float() - direct.float()).abs().max().item()
        results.append({"check": "rerotation", "arch": arch, "dtype": str(dtype).split(".")[-1],
                        "max_abs_diff": diff, "tolerance": tol, "ok": diff <= tol and on_device(moved)})


def check_cache_roundtrip(arch, results):
    model = tiny_model(arch).to(DEVICE)
    ids, question = _ids(CONTEXT, 3, DEVICE), _ids(4, 4, DEVICE)
    _, _, cache = question_logits(model, get_press("knorm", compression_ratio=0.5), ids, question)
    # the cache now also holds the question; reload and continue with one more token
    nxt = _ids(1, 5, DEVICE)
    with tempfile.TemporaryDirectory() as tmp:
        save_cache(cache, Path(tmp) / "c", model=model)
        loaded, _ = load_cache(Path(tmp) / "c", model=model)
        with torch.no_grad():
            a = model(input_ids=nxt, past_key_values=cache).logits
            b = model(input_ids=nxt, past_key_values=loaded).logits
    on_gpu = all(on_device(layer.keys) and on_device(layer.values) for layer in loaded.layers)
    diff = (a - b).abs().max().item()
    results.append({"check": "cache_roundtrip", "arch": arch, "max_abs_diff": diff, "tolerance": 0.0,
                    "loaded_on_gpu": on_gpu, "ok": diff == 0.0 and on_gpu})


def check_a3(arch, results):
    model = tiny_model(arch, layers=3).to(DEVICE)
    g = torch.Generator().manual_seed(6)
    chunks = [torch.randint(3, 100, (n,), generator=g).tolist() for n in (16, 24, 20)]
    q = torch.randint(3, 100, (5,), generator=g).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        store = ChunkStore(tmp, model)
        _, logits = A3Press(strategy="debug", rate=1.0, store=store).fuse(model, chunks, q)
        with torch.no_grad():
            full = model(torch.tensor([[1] + [t for c in chunks for t in c] + q], device=DEVICE)).logits[0, -len(q):]
        partial = A3Press(strategy="debug", rate=0.15, store=store).fuse_result(model, chunks, q)
    diff = (logits - full).abs().max().item()
    results.append({"check": "a3_full_recompute", "arch": arch, "max_abs_diff": diff, "tolerance": 1e-4,
                    "partial_selected": int(partial.selected.numel()),
                    "ok": diff <= 1e-4 and on_device(logits) and on_device(partial.logits)})


def name_of(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else "cpu (dry run)"


@command_entry("gpu_checks")
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None, help="write every check's record here")
    ap.add_argument("--device", default="cuda", help="cuda (cpu: a dry run of the script, no evidence)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        print("error: gpu_checks needs a CUDA device (this machine has none); run it on a GPU machine.",
              file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results, errors = [], []
    t0 = time.perf_counter()
    for arch in ARCHITECTURES:
        for check in (check_presses, check_rerotation, check_cache_roundtrip, check_a3):
            try:
                check(arch, results)
            except Exception as exc:  # noqa: BLE001 - a crash is a failed check, recorded, and the rest goes on
                errors.append({"check": check.__name__, "arch": arch, "error": f"{type(exc).__name__}: {exc}",
                               "traceback": traceback.format_exc(limit=4), "ok": False})
    failed = [r for r in results if not r["ok"]] + errors
    for r in results + errors:
        what = " ".join(str(r[k]) for k in ("check", "arch", "press", "dtype") if k in r)
        detail = r.get("error") or f"max|diff| {r['max_abs_diff']:.3g} (tol {r['tolerance']:g})"
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {what}: {detail}")
    print(f"{len(results) + len(errors) - len(failed)}/{len(results) + len(errors)} checks passed on "
          f"{name_of(DEVICE)} in {time.perf_counter() - t0:.1f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_output(args.json, json.dumps({"device": name_of(DEVICE), "torch": torch.__version__,
                                               "results": results, "errors": errors}, indent=1), flag="--json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
