"""Decode throughput and memory at the lengths compression is for: every config at each position and batch size.

    PYTHONPATH=$PWD python benchmarks/throughput.py --model smollm2-135m --positions 1024 2048 4096 --batch 1 8 \
        --configs full rkv@512 lazy_streaming@512 snapkv@512 --output FILE.json

A config is ``full`` or ``NAME@TOKENS`` (see :mod:`kvpress_ext.evaluation.throughput`). At each position P (tokens
of real text already in each sequence when timing starts) and batch B the configs run in one process, taking turns
every ``--block`` tokens (default one compression interval, so every round holds one compression of each config),
over ``--window`` timed tokens (default three intervals: three rounds), timed by
:func:`kvpress_ext.evaluation.timing.compare`. Reported per config: tokens/s, its ratio to ``full`` at the same P
and B with the per-round spread, threads, load before and after and the reliable flag with its reasons, the share of decode
time in compression, peak KV (MiB) and the process's peak RSS (shared by the configs of a run). ``--kv_memory
BYTES``: the largest batch each config fits in that much KV memory at the largest position, and the tokens/s it
reaches there (measured). Records go to ``--output`` (JSON), a table to stdout and a plot of tokens/s against
position next to the JSON. Bad input (an unknown config, a budget of 0) exits 2 with one line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

from kvpress_ext.cli.common import command_entry
from kvpress_ext.core.errors import KVPressExtError
from kvpress_ext.evaluation.results import load_text
from kvpress_ext.evaluation.throughput import MIB, build_config, largest_batch, run_interleaved
from kvpress_ext.runtime.models import load_model
from kvpress_ext.storage.inputs import shared_dir
from kvpress_ext.storage.safe_write import save_figure, write_output


def _plot(records: list[dict], path: Path) -> None:
    import matplotlib  # optional heavy dependency, only for the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (config, batch) in sorted({(r["config"], r["batch"]) for r in records}):
        rows = sorted((r for r in records if r["config"] == config and r["batch"] == batch), key=lambda r: r["position"])
        ax.plot([r["position"] for r in rows], [r["tok_s"] for r in rows], marker="o", label=f"{config}, batch {batch}")
    ax.set(xlabel="position (tokens in each sequence)", ylabel="decode tokens/s", xscale="log", yscale="log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def _x_full(r: dict) -> str:
    """``0.97 (3 %)``: tok/s against full and the spread of the per-round ratios; ``-`` without a full run."""
    if r["x_full"] is None:
        return "-"
    spread = r["timing"].get("speedup_spread", 0.0)
    return f"{r['x_full']:.2f} ({100 * spread:.0f} %)"


@command_entry("throughput")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--positions", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--configs", nargs="+", default=["full", "rkv@512", "lazy_streaming@512", "snapkv@512"])
    p.add_argument("--interval", type=int, default=128, help="tokens between compressions while decoding")
    p.add_argument("--window", type=int, default=None, help="timed tokens per config (default 3 x --interval)")
    p.add_argument("--block", type=int, default=None,
                   help="tokens a config decodes per round before the next one's turn (default --interval)")
    p.add_argument("--kv_memory", type=int, default=None, help="bytes of KV memory for the largest-batch measure")
    p.add_argument("--profile", type=int, default=0, metavar="TOP",
                   help="after timing, profile 4 more decoding steps of each config: its TOP operators by self CPU time")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    for config in args.configs:
        build_config(config, args.interval)  # bad names and budgets fail before the model loads
    args.block = args.block or args.interval
    if min(args.positions + args.batch) < 1 or args.block < 1 or args.interval < 1:
        raise KVPressExtError("--positions, --batch, --block and --interval must be positive integers.")
    torch.set_num_threads(args.threads)
    window = args.window or 3 * args.interval
    model, tokenizer = load_model(args.model, device="cpu", dtype=args.dtype)
    text = (shared_dir() / "data" / "pride_and_prejudice.txt").read_text(encoding="utf-8")
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    records = []
    for batch in args.batch:
        for position in args.positions:
            got = run_interleaved(model, text_ids, args.configs, position, batch, window, args.block, args.interval,
                                  profile=args.profile)
            for r in got:
                r.update(peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
                print(f"P={position:>5} B={batch:>2} {r['config']:>20}: {r['tok_s']:7.1f} tok/s "
                      f"(blocks {r['tok_s_blocks_min']:.1f}-{r['tok_s_blocks_max']:.1f}), x full "
                      f"{_x_full(r)}, compression {r['compression_share']:.1%}, "
                      f"peak KV {r['peak_kv_mib']:.1f} MiB", flush=True)
                if r.get("profile"):
                    print("      profile: " + ", ".join(f"{o['op']} {o['self_s']:.2f}s ({100 * o['share']:.0f} %)"
                                                       for o in r["profile"]), flush=True)
            t = got[0]["timing"]
            print(f"  threads {t['threads']}, {load_text(t['load_start'], t['load_end'])}; "
                  f"{'reliable' if t['reliable'] else 'UNRELIABLE: ' + '; '.join(t['reasons'])}", flush=True)
            records += got
    fits = []
    if args.kv_memory:
        position = max(args.positions)
        for config in args.configs:
            per_seq = max(r["peak_kv_mib_per_sequence"] for r in records if r["config"] == config)
            b = largest_batch(args.kv_memory, per_seq)
            got = run_interleaved(model, text_ids, [config], position, b, window, args.block, args.interval) if b else []
            fits.append({"config": config, "kv_memory": args.kv_memory, "position": position, "largest_batch": b,
                         "tok_s": got[0]["tok_s"] if got else 0.0})
            print(f"{config:>20}: {b} sequences in {args.kv_memory / MIB:.0f} MiB of KV at P={position}, "
                  f"{fits[-1]['tok_s']:.1f} tok/s", flush=True)
    print("\n| position | batch | config | tok/s | x full (per-round spread) | reliable | compression share | "
          "peak KV (MiB) |")
    print("|---:|---:|---|---:|---:|---|---:|---:|")
    for r in records:
        flag = "yes" if r["timing"]["reliable"] else "no (reasons above)"
        print(f"| {r['position']} | {r['batch']} | {r['config']} | {r['tok_s']:.1f} | {_x_full(r)} | {flag} | "
              f"{r['compression_share']:.1%} | {r['peak_kv_mib']:.1f} |")
    if args.output:
        meta = {"command": " ".join(sys.argv), "model": args.model, "dtype": args.dtype, "threads": args.threads,
                "window": window, "block": args.block, "interval": args.interval, "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count()}
        write_output(args.output, json.dumps({"meta": meta, "records": records, "kv_memory": fits}, indent=1),
                     flag="--output")
        _plot(records, Path(args.output).with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
