"""What splitting a model with accelerate costs: the same random Llama loaded whole, with its middle layers
offloaded to disk, and with ``max_memory`` (accelerate's ``auto`` map), timed on one prefill + greedy decode.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/offload_overhead.py --out results/offload_overhead.json

On a CPU-only machine the execution device is the CPU for every layer, so the difference is accelerate's hooks
plus reading offloaded weights back from disk (memory-mapped safetensors, page cache warm after the warm-up run).
The logits of the split runs are checked against the whole model's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from transformers import DynamicCache

from kvpress_ext.cli.common import command_entry
from kvpress_ext.runtime.models import load_model
from kvpress_ext.storage.safe_write import write_output
from kvpress_ext.testing import middle_layers_on_disk, save_tiny_model


@torch.no_grad()
def run_once(model, ids, new_tokens):
    cache = DynamicCache()
    t0 = time.perf_counter()
    out = model(input_ids=ids, past_key_values=cache)
    prefill = time.perf_counter() - t0
    logits = [out.logits[0, -1]]
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache)
        logits.append(out.logits[0, -1])
    return prefill, (time.perf_counter() - t1) / new_tokens, torch.stack(logits)


def measure(model, ids, new_tokens, runs):
    run_once(model, ids, 2)  # warm-up (and page cache for offloaded weights)
    results = [run_once(model, ids, new_tokens) for _ in range(runs)]
    return (statistics.median(r[0] for r in results), statistics.median(r[1] for r in results), results[0][2])


@command_entry("offload_overhead")
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--max_memory", default="30MB", help="CPU budget for the auto map (the rest goes to disk)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tmp = Path(tempfile.mkdtemp(prefix="offload_overhead_"))
    _, n_params = save_tiny_model("llama", tmp / "model", layers=args.layers, hidden=args.hidden, heads=8, kv_heads=4,
                                  vocab_size=128)
    ids = torch.randint(4, 120, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    whole, _ = load_model(str(tmp / "model"), device="cpu", attn_implementation="sdpa")
    variants = {
        "whole": whole,
        "middle_layers_on_disk": load_model(str(tmp / "model"), device_map=middle_layers_on_disk(whole),
                                            offload_folder=str(tmp / "off1"), attn_implementation="sdpa")[0],
        f"auto_max_memory_cpu={args.max_memory}": load_model(str(tmp / "model"), max_memory={"cpu": args.max_memory},
                                                            offload_folder=str(tmp / "off2"),
                                                            attn_implementation="sdpa")[0],
    }
    rows, ref = {}, None
    for name, model in variants.items():
        prefill, per_token, logits = measure(model, ids, args.new_tokens, args.runs)
        ref = logits if ref is None else ref
        placement = getattr(model, "hf_device_map", None)
        rows[name] = {"prefill_s": round(prefill, 4), "decode_s_per_token": round(per_token, 5),
                      "max_abs_logit_diff_vs_whole": float((logits - ref).abs().max()),
                      "layers_on_disk": sum(1 for k, v in (placement or {}).items() if v == "disk" and ".layers." in k)}
    base = rows["whole"]
    for row in rows.values():
        row["prefill_ratio"] = round(row["prefill_s"] / base["prefill_s"], 2)
        row["decode_ratio"] = round(row["decode_s_per_token"] / base["decode_s_per_token"], 2)
    result = {"model": f"random llama, {args.layers} layers, hidden {args.hidden}, {n_params / 1e6:.1f}M params, float32",
              "prompt_tokens": args.prompt, "new_tokens": args.new_tokens, "runs": args.runs, "variants": rows,
              "threads": torch.get_num_threads(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "load_avg_1min": round(os.getloadavg()[0], 2), "date": date.today().isoformat()}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_output(args.out, json.dumps(result, indent=2) + "\n", flag="--out")


if __name__ == "__main__":
    sys.exit(main())
