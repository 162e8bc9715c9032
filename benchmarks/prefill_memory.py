"""Peak KV and process memory of a prefill through a press: one pass against chunks compressed as they arrive.

    PYTHONPATH=$PWD python benchmarks/prefill_memory.py --model smollm2-135m --lengths 4096 8192 --press knorm \
        --ratio 0.75 --chunk 512 --output docs/results/data/prefill_memory_smollm2.json

Each (length, mode) runs in its own process, so the peak RSS is that prefill's own. The context is real text
(Pride and Prejudice from the shared data). See :mod:`kvpress_ext.evaluation.prefill_memory` for what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from kvpress_ext.cli.common import command_entry
from kvpress_ext.core.registry import get_press
from kvpress_ext.evaluation.prefill_memory import measure_prefill
from kvpress_ext.evaluation.results import machine_load
from kvpress_ext.runtime.models import load_model
from kvpress_ext.storage.inputs import shared_dir
from kvpress_ext.storage.safe_write import write_output


def _context_ids(tokenizer, n: int) -> torch.Tensor:
    text = (shared_dir() / "data" / "pride_and_prejudice.txt").read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than --lengths {n}")
    return torch.tensor([ids[:n]])


def _one(args) -> dict:
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, device="cpu", dtype="float32")
    ids = _context_ids(tokenizer, args.length)
    press = get_press(args.press, compression_ratio=args.ratio)
    measure_prefill(model, ids[:, :64], press, None)  # warm-up
    record = measure_prefill(model, ids, press, args.chunk or None)
    record.update(model=args.model, press=args.press, ratio=args.ratio, threads=args.threads)
    return record


@command_entry("prefill_memory")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--press", default="knorm")
    p.add_argument("--ratio", type=float, default=0.75)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default=None)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)  # one measurement (child process)
    args = p.parse_args(argv)
    if args.length is not None:
        print(json.dumps(_one(args)))
        return 0
    records = []
    for n in args.lengths:
        for chunk in (None, args.chunk):
            cmd = [sys.executable, __file__, "--model", args.model, "--press", args.press, "--ratio", str(args.ratio),
                   "--threads", str(args.threads), "--length", str(n)] + (["--chunk", str(chunk)] if chunk else [])
            if chunk is None:
                cmd += ["--chunk", "0"]
            start = machine_load()
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ).stdout
            record = json.loads(out.strip().splitlines()[-1])
            record.update(load_start=start, load_end=machine_load())
            records.append(record)
            mib = 2**20
            print(f"{n:>6} {'chunks of ' + str(chunk) if chunk else 'one pass':>14}: peak KV "
                  f"{record['peak_kv_bytes'] / mib:7.1f} MiB, final KV {record['final_kv_bytes'] / mib:6.1f} MiB, "
                  f"peak RSS {record['peak_rss_bytes'] / mib:6.0f} MiB (before {record['rss_before_bytes'] / mib:.0f}),"
                  f" {record['seconds']:.1f} s", flush=True)
    if args.output:
        write_output(args.output, json.dumps(records, indent=2), flag="--output")
    return 0


if __name__ == "__main__":
    sys.exit(main())
