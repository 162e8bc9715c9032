"""What splitting a model with accelerate costs: the same random Llama loaded whole, with its middle layers
offloaded to disk, and with ``max_memory`` (accelerate's ``auto`` map), timed on one prefill + greedy decode.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/offload_overhead.py --out results/offload_overhead.json

On a CPU-only machine the execution device is the CPU for every layer, so the difference is accelerate's hooks
plus reading offloaded weights back from disk (memory-mapped safetensors, page cache warm after the warm-up run).
The logits of the split runs are checked against the whole model's. The three placements run interleaved through
:func:`kvpress_ext.evaluation.timing.compare` (one warm-up round, ``--runs`` rounds); the prefill and decode ratios
to the whole model are medians of per-round ratios with their spread, next to threads, load and the reliable flag.
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
from kvpress_ext.evaluation.timing import compare, relative_spread
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


def per_round(log: dict, name: str, ref: str, index: int) -> dict:
    """Median and spread of the per-round ratio of field ``index`` (0 prefill, 1 decode) of ``name`` to ``ref``."""
    values = [a[index] / b[index] for a, b in zip(log[name], log[ref])]
    return {"median": round(statistics.median(values), 3), "spread": round(relative_spread(values), 3)}


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
    log: dict = {name: [] for name in variants}

    def side(name, model):
        return lambda: log[name].append(run_once(model, ids, args.new_tokens))

    c = compare({name: side(name, model) for name, model in variants.items()}, "whole", repeat=args.runs)
    rows = {}
    for name, model in variants.items():
        runs = log[name][1:]  # the first entry is the warm-up round
        placement = getattr(model, "hf_device_map", None)
        rows[name] = {"prefill_s": round(statistics.median(r[0] for r in runs), 4),
                      "decode_s_per_token": round(statistics.median(r[1] for r in runs), 5),
                      "max_abs_logit_diff_vs_whole": float((runs[0][2] - log["whole"][1][2]).abs().max()),
                      "layers_on_disk": sum(1 for k, v in (placement or {}).items() if v == "disk" and ".layers." in k)}
        ratio = {k: v[1:] for k, v in log.items()}
        rows[name]["prefill_ratio"] = per_round(ratio, name, "whole", 0)
        rows[name]["decode_ratio"] = per_round(ratio, name, "whole", 1)
        if name != "whole":
            rows[name]["timing"] = c.record(name)
    result = {"model": f"random llama, {args.layers} layers, hidden {args.hidden}, {n_params / 1e6:.1f}M params, float32",
              "prompt_tokens": args.prompt, "new_tokens": args.new_tokens, "runs": args.runs, "variants": rows,
              "threads": torch.get_num_threads(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "load_start": c.loads[0], "load_end": c.loads[-1], "reliable": c.reliable, "reasons": c.reasons,
              "date": date.today().isoformat()}
    print(json.dumps(result, indent=2))
    for name, row in rows.items():
        print(f"{name:>28}: prefill x{row['prefill_ratio']['median']:.2f} (spread "
              f"{100 * row['prefill_ratio']['spread']:.0f} %), decode x{row['decode_ratio']['median']:.2f} (spread "
              f"{100 * row['decode_ratio']['spread']:.0f} %)")
    print(c.flag())
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_output(args.out, json.dumps(result, indent=2) + "\n", flag="--out")


if __name__ == "__main__":
    sys.exit(main())
