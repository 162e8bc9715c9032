"""A³'s selective attention: query blocks over their visible key prefix vs one masked pass vs a causal prefill.

    PYTHONPATH=$PWD python benchmarks/a3_attention.py --threads 1

Shapes of Llama-3.2-1B's attention (32 query heads, 8 KV heads, head_dim 64) at ``--keys`` tokens; the queries
are 15 % of the document tokens at sorted random positions plus a 32-token question at the end, as fusion
recomputes them after the selection layer. All three run in one process through
:func:`kvpress_ext.evaluation.timing.compare` (warm-up, ``--repeat`` interleaved rounds); the ratios are medians of
per-round ratios with their spread, and the reliable flag, threads and load are printed (``--json`` keeps them).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from kvpress_ext.cli.common import command_entry
from kvpress_ext.evaluation.results import load_text
from kvpress_ext.evaluation.timing import compare
from kvpress_ext.presses.a3.attention import blocked_torch_attention, causal_mask, torch_attention
from kvpress_ext.storage.safe_write import write_output


@command_entry("a3_attention")
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=8192)
    ap.add_argument("--rate", type=float, default=0.15)
    ap.add_argument("--question", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--json", default=None, help="JSON file for the ratios and their timing record")
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
        c = compare({"causal": lambda: F.scaled_dot_product_attention(full_q, k, v, is_causal=True, enable_gqa=True),
                     "blocked": lambda: blocked_torch_attention(q, k, v, qpos, kpos, 0.125),
                     "single": lambda: torch_attention(q, k, v, mask, 0.125)}, "causal", repeat=args.repeat)
    single_x = c.between("single", "blocked")
    blocked_x = c.record("blocked")
    print(f"{len(qpos)} queries over {n} keys, threads={c.threads}, {load_text(c.loads[0], c.loads[-1])}")
    print(f"blocked (visible prefix per 128 queries): {c.sides['blocked'].median:.3f} s")
    print(f"one masked pass:                          {c.sides['single'].median:.3f} s  ({single_x['median']:.2f}x "
          f"the blocked time, spread {100 * single_x['spread']:.0f} %)")
    print(f"causal prefill of all {n} queries:        {c.sides['causal'].median:.3f} s  (blocked / causal = "
          f"{blocked_x['ratio']:.3f}, spread {100 * blocked_x['ratio_spread']:.0f} %)")
    print(c.flag())
    if args.json:
        write_output(args.json, json.dumps({"args": vars(args), "blocked_over_causal": blocked_x,
                                            "single_over_blocked": single_x, "timing": c.as_dict()}, indent=1),
                     flag="--json")

if __name__ == "__main__":
    sys.exit(main())
