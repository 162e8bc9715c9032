"""R-KV scoring speed: our batched implementation vs a literal per-token reference (loops over tokens).

    PYTHONPATH=$PWD python benchmarks/rkv_scoring.py --lengths 128,256,512,1024

The reference follows the formula token by token (one dot product per query/key pair and per key pair), as a
direct port would; both produce the same scores (checked here, and in tests/test_rkv.py on small inputs). Both are
timed through :func:`kvpress_ext.evaluation.timing.compare` (warm-up, ``--rounds`` interleaved rounds); the
speed-up is the median per-round ratio, printed with its spread and the reliable flag (with threads and load).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from kvpress_ext.cli.common import command_entry
from kvpress_ext.evaluation.results import load_text
from kvpress_ext.evaluation.timing import compare
from kvpress_ext.presses.rkv import rkv_scores
from kvpress_ext.storage.safe_write import write_output


def literal_scores(queries, keys, window, kernel, lam):
    """Per-token loops over keys (vectorised only over the head dimension)."""
    b, hq, w, d = queries.shape
    _, h, n, _ = keys.shape
    g, cand = hq // h, n - window
    out = torch.empty(b, h, cand)
    for hi in range(h):
        k = keys[0, hi]
        kn = k / (k.norm(dim=-1, keepdim=True) + 1e-8)
        attn = torch.zeros(cand)
        for i in range(w):
            logits = torch.stack([max(queries[0, hi * g + gg, i] @ k[j] for gg in range(g)) for j in range(cand)])
            attn += (logits / d**0.5).softmax(-1) / w
        pooled = torch.stack([attn[max(0, j - kernel // 2): j + kernel // 2 + 1].max() for j in range(cand)])
        sim = torch.empty(n, n)
        for i in range(n):
            sim[i] = torch.stack([kn[i] @ kn[j] if j != i else torch.tensor(0.0) for j in range(n)])
            similar = (sim[i] > 0.5).nonzero()
            sim[i, similar[-1] if len(similar) else 0] = 0.0  # spare the last similar key (column 0 if none)
        means = sim.mean(dim=0)  # per key: mean over the rows
        out[0, hi] = lam * pooled - (1 - lam) * means.softmax(-1)[:cand]
    return out


@command_entry("rkv_scoring")
def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", default="128,256,512,1024")
    parser.add_argument("--heads", type=int, default=2, help="KV heads (query heads = 2x)")
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--reference_max", type=int, default=512, help="skip the slow reference above this length")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds per length")
    parser.add_argument("--json", default=None, help="JSON file for the records (ratio, spread, load, reliable)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print("| cache length | ours (ms) | literal reference (ms) | speed-up (spread) | max abs diff | reliable |")
    print("|---:|---:|---:|---:|---:|---|")
    records = []
    for n in [int(x) for x in args.lengths.split(",")]:
        keys = torch.randn(1, args.heads, n, args.head_dim)
        queries = torch.randn(1, 2 * args.heads, args.window, args.head_dim)
        sides = {"ours": lambda q=queries, k=keys: rkv_scores(q, k, args.window)}
        if n <= args.reference_max:
            sides["reference"] = lambda q=queries, k=keys: literal_scores(q, k, args.window, 7, 0.07)
        c = compare(sides, "ours", repeat=args.rounds)
        ours = c.sides["ours"].median * 1e3
        if "reference" not in sides:
            print(f"| {n} | {ours:.2f} | (skipped) | | | |")
            continue
        diff = (c.results["ours"] - c.results["reference"]).abs().max().item()
        r = c.record("reference")  # reference / ours: the speed-up
        records.append({"length": n, "ours_ms": ours, "reference_ms": c.sides["reference"].median * 1e3,
                        "max_abs_diff": diff, **r})
        print(f"| {n} | {ours:.2f} | {records[-1]['reference_ms']:.0f} | {r['ratio']:.0f}x "
              f"({100 * r['ratio_spread']:.0f} %) | {diff:.1e} | {c.flag()} |")
    if records:
        print(f"threads {records[0]['threads']}; {load_text(records[0]['load_start'], records[-1]['load_end'])}")
    if args.json:
        write_output(args.json, json.dumps({"args": vars(args), "records": records}, indent=1), flag="--json")

if __name__ == "__main__":
    sys.exit(main())
