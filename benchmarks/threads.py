"""How many torch CPU threads the commands should use by default: 1 against 2 (or more), idle and under load.

For each model shape and thread count, times a prefill (one forward over ``--prefill`` tokens) and greedy
decoding (``--steps`` tokens, one forward each), as the commands do. ``--load N`` starts N busy processes
(pure-Python loops, ended by this script) for the run, standing in for other jobs on the machine; the
machine's load average is recorded at the start and end of every measurement, so a result says how busy
the machine was. Rounds interleave the thread counts so a change in background load hits all of them.

    PYTHONPATH=$PWD python benchmarks/threads.py --models stories260k,pythia70m-random --threads 1,2 --load 0
    PYTHONPATH=$PWD python benchmarks/threads.py --models stories260k,pythia70m-random --threads 1,2 --load 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from streaming_speed import build_model

from kvpress_ext.cli.common import command_entry
from kvpress_ext.evaluation.results import machine_load
from kvpress_ext.storage.safe_write import write_output


def _busy() -> None:  # pragma: no cover - runs in a child process until terminated
    while True:
        pass


@torch.no_grad()
def measure(model, prefill: int, steps: int) -> dict:
    """Seconds of one prefill of ``prefill`` tokens and decode tokens/s over ``steps`` greedy steps."""
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (1, prefill), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache()
    t0 = time.perf_counter()
    out = model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
    prefill_s = time.perf_counter() - t0
    token = out.logits[:, -1:].argmax(-1)
    t1 = time.perf_counter()
    for _ in range(steps):
        token = model(input_ids=token, past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
    return {"prefill_s": prefill_s, "decode_tok_per_s": steps / (time.perf_counter() - t1)}


@command_entry("threads")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="stories260k,pythia70m-random",
                   help="comma-separated shapes: stories260k, pythia70m-random, llama1b-random")
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts to compare")
    p.add_argument("--load", type=int, default=0, help="busy background processes started for the run")
    p.add_argument("--prefill", type=int, default=512, help="prompt tokens of the timed prefill")
    p.add_argument("--steps", type=int, default=64, help="greedy decoding steps timed")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per setting (median reported)")
    p.add_argument("--json", default=None, help="write the rows and load averages to this JSON file")
    args = p.parse_args(argv)
    counts = [int(t) for t in args.threads.split(",")]
    busy = [multiprocessing.Process(target=_busy, daemon=True) for _ in range(args.load)]
    for proc in busy:
        proc.start()
    rows = []
    start_load = machine_load()
    try:
        for name in args.models.split(","):
            model = build_model(name)
            results = {n: [] for n in counts}
            for n in counts:  # untimed warm-up per thread count
                torch.set_num_threads(n)
                measure(model, min(args.prefill, 64), 4)
            for _ in range(args.rounds):
                for n in counts:
                    torch.set_num_threads(n)
                    results[n].append({**measure(model, args.prefill, args.steps), "load": machine_load()})
            for n in counts:
                runs = results[n]
                row = {"model": name, "threads": n, "background_load": args.load,
                       "prefill_s": statistics.median(r["prefill_s"] for r in runs),
                       "decode_tok_per_s": statistics.median(r["decode_tok_per_s"] for r in runs),
                       "loadavg_1m": [r["load"]["loadavg_1m"] for r in runs]}
                rows.append(row)
                print(f"{name:18s} threads={n} background={args.load}: prefill {row['prefill_s'] * 1e3:8.1f} ms, "
                      f"decode {row['decode_tok_per_s']:7.1f} tok/s (load average "
                      f"{', '.join(f'{x:.1f}' for x in row['loadavg_1m'])} on {os.cpu_count()} CPUs)", flush=True)
    finally:
        for proc in busy:
            proc.terminate()
            proc.join()
    result = {"args": vars(args), "load_start": start_load, "load_end": machine_load(), "rows": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_output(args.json, json.dumps(result, indent=1) + "\n", flag="--json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
