"""A³'s selective attention: query blocks over their visible key prefix vs one masked pass vs a causal prefill.

    PYTHONPATH=$PWD python benchmarks/a3_attention.py --threads 1

Shapes of Llama-3.2-1B's attention (32 query heads, 8 KV heads, head_dim 64) at ``--keys`` tokens; the queries
are 15 % of the document tokens at sorted random positions plus a 32-token question at the end, as fusion
recomputes them after the selection layer. All three run in one process; times are the best of ``--repeat``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from kvpress_ext.cli.common import command_entry
from kvpress_ext.presses.a3.attention import blocked_torch_attention, causal_mask, torch_attention


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


@command_entry("a3_attention")
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=8192)
    ap.add_argument("--rate", type=float, default=0.15)
    ap.add_argument("--question", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n, doc = args.keys, args.keys - args.question
    picked = torch.randperm(doc, generator=g)[: int(args.rate * doc)].sort().values
    qpos = torch.cat([picked, torch.arange(doc, n)])
    kpos = torch.arange(n)
    q = torch.randn(1, 32, len(qpos), 64, generator=g)
    k, v = torch.randn(1, 8, n, 64, generator=g), torch.randn(1, 8, n, 64, generator=g)
    full_q = torch.randn(1, 32, n, 64, generator=g)
    mask = causal_mask(qpos, kpos)
    with torch.no_grad():
        blocked = best_of(lambda: blocked_torch_attention(q, k, v, qpos, kpos, 0.125), args.repeat)
        single = best_of(lambda: torch_attention(q, k, v, mask, 0.125), args.repeat)
        causal = best_of(lambda: F.scaled_dot_product_attention(full_q, k, v, is_causal=True, enable_gqa=True),
                         args.repeat)
    print(f"{len(qpos)} queries over {n} keys, threads={torch.get_num_threads()}")
    print(f"blocked (visible prefix per 128 queries): {blocked:.3f} s")
    print(f"one masked pass:                          {single:.3f} s  ({single / blocked:.2f}x the blocked time)")
    print(f"causal prefill of all {n} queries:        {causal:.3f} s  (blocked / causal = {blocked / causal:.3f})")


if __name__ == "__main__":
    sys.exit(main())
