"""R-KV scoring speed: our implementation against two references on the same keys, queries, window and budget.

    PYTHONPATH=$PWD python benchmarks/rkv_scoring.py --lengths 1024,2048,4096

- upstream-style: R-KV's published scoring restated tensor for tensor (:func:`upstream_style_scores`): the whole
  L x L cosine similarity per head, its L x L int64 index tensor, a max per row, a scatter, a column mean and a
  softmax; the window's attention over every key, sliced, softmaxed, averaged and max-pooled. The ratio to it is
  the one to quote: it is what a user of the reference code runs.
- literal (only up to ``--reference_max`` tokens): the formula token by token (one dot product per query/key
  pair and per key pair), a strawman kept to check the scores, not a ratio to quote.

Every side is timed through :func:`kvpress_ext.evaluation.timing.compare` (warm-up, ``--rounds`` interleaved
rounds); a speed-up is the median per-round ratio, printed with its spread and the reliable flag. The scores are
compared (max abs diff) and so are the kept tokens at the same budget (top ``budget - window`` + the window, per
head): the share of ours also in the upstream-style set ("kept overlap", 1.000 when they are the same).

``--keys random`` (default): Gaussian keys are almost never similar (cosine > 0.5), so nearly every row spares
column 0 and our block scan for the similar column runs to the far end, its worst case. ``--keys clustered``:
near-duplicates of L / 16 directions (cosine ~0.8 within a cluster), where most rows find a similar key among
the last ones, as real keys do (see :func:`kvpress_ext.presses.rkv._redundancy_by_blocks`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F

from kvpress_ext.cli.common import add_threads_argument, command_entry, positive_int, probability_mass, set_threads
from kvpress_ext.core.errors import KVPressExtError
from kvpress_ext.evaluation.results import load_text
from kvpress_ext.evaluation.timing import compare
from kvpress_ext.presses.rkv import rkv_scores, rkv_select
from kvpress_ext.runtime.threads import threads_text
from kvpress_ext.storage.safe_write import write_output

#: the upstream code this benchmark restates (github.com/Zefan-Cai/R-KV, newest snapshot read)
UPSTREAM = "Zefan-Cai/R-KV@d15c976 rkv/utils.py (cal_similarity, compute_attention_scores), rkv/compression/r1_kv.py"


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


def upstream_style_scores(queries, keys, window, kernel=7, lam=0.07, threshold=0.5):
    """R-KV's published scores (:data:`UPSTREAM`, ``retain_direction="last"``) with its tensor operations, so
    that timing it times the reference code: (B, H, L - window).

    Where the published code differs from ours in what it computes: its redundancy uses the first batch
    element's keys for every element (equal to ours at batch 1, the only case compared here); a row with no
    similar key spares column 0 (as ours).
    """
    b, hq, w, d = queries.shape
    h, n = keys.shape[1], keys.shape[2]
    # importance: every window query against every key (window keys included), max over the KV head's group
    grouped = queries.view(b, h, hq // h, w, d)
    logits = (grouped @ keys.unsqueeze(2).transpose(3, 4) / math.sqrt(d)).max(dim=2).values
    attn = logits[:, :, -window:, :-window].softmax(dim=-1, dtype=torch.float32).mean(dim=-2).to(queries.dtype)
    attn = F.max_pool1d(attn, kernel_size=kernel, padding=kernel // 2, stride=1)
    # redundancy: the whole cosine similarity of batch element 0's keys, per head
    unit = keys[0] / (keys[0].norm(dim=-1, keepdim=True) + 1e-8)
    sim = unit @ unit.transpose(-1, -2)
    for hi in range(h):
        sim[hi].fill_diagonal_(0.0)
    similar = sim > threshold
    column = torch.where(similar, torch.arange(n), torch.zeros_like(similar, dtype=torch.long))
    spared = column.max(dim=-1).values  # the last similar column, 0 when none
    sim[torch.arange(h).unsqueeze(1).expand(h, n), torch.arange(n).expand(h, n), spared] = 0.0
    redundancy = sim.mean(dim=1).softmax(dim=-1)[:, :-window]
    return attn * lam - redundancy * (1 - lam)


def upstream_style_kept(scores, budget, window):
    """The cache indices the published update_kv keeps for ``scores`` (B, H, L - window), sorted: the top
    ``budget - window`` by score, then the last ``window``."""
    n = scores.shape[-1] + window
    top = scores.topk(budget - window, dim=-1).indices
    recent = torch.arange(n - window, n).expand(*top.shape[:-1], window)
    return torch.cat([top, recent], dim=-1).sort(dim=-1).values


def make_keys(kind: str, heads: int, n: int, d: int) -> torch.Tensor:
    """(1, heads, n, d) keys: ``random`` Gaussian, or ``clustered`` (each a random one of n / 16 centres plus
    noise of half the centres' scale)."""
    if kind == "random":
        return torch.randn(1, heads, n, d)
    centres = torch.randn(heads, max(1, n // 16), d)
    member = torch.randint(0, centres.shape[1], (heads, n))
    return (centres.gather(1, member.unsqueeze(-1).expand(-1, -1, d)) + 0.5 * torch.randn(heads, n, d)).unsqueeze(0)


def kept_overlap(ours, theirs) -> float:
    """Share of the kept indices ``ours`` (B, H, k) that ``theirs`` also keeps, over every head."""
    same = sum(len(set(a.tolist()) & set(t.tolist())) for a, t in zip(ours.flatten(0, -2), theirs.flatten(0, -2)))
    return same / ours[..., 0].numel() / ours.shape[-1]


def _lengths(text: str) -> list[int]:
    """argparse type: comma-separated positive cache lengths."""
    return [positive_int(x) for x in text.split(",")]


@command_entry("rkv_scoring")
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=_lengths, default="1024,2048,4096", help="cache lengths, comma-separated")
    parser.add_argument("--heads", type=int, default=2, help="KV heads (query heads = 2x)")
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--window", type=positive_int, default=8, help="recent window: its queries score, its keys stay")
    parser.add_argument("--budget_fraction", type=probability_mass, default=0.25,
                        help="budget (kept tokens per head, window included) = this share of the length, in (0, 1]")
    parser.add_argument("--reference_max", type=int, default=512, help="skip the slow literal loop above this length")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds per length")
    parser.add_argument("--keys", choices=("random", "clustered"), default="random",
                        help="random: rows rarely have a similar key (our worst case); clustered: most rows do")
    add_threads_argument(parser)
    parser.add_argument("--json", default=None, help="JSON file for the records (ratio, spread, load, reliable)")
    args = parser.parse_args()
    lengths = args.lengths
    if min(lengths) <= args.window:
        raise KVPressExtError(f"--lengths must all exceed --window ({args.window}): pass longer caches.")
    threads = set_threads(args.threads)
    torch.manual_seed(0)
    kernel, lam = 7, 0.07
    print(f"upstream-style reference: {UPSTREAM}; {args.keys} keys; {threads_text(threads)}")
    print("| cache length | budget | ours (ms) | upstream-style (ms) | speed-up (spread) | max abs diff | kept overlap "
          "| literal loop (ms) | speed-up (spread) | reliable |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    records = []
    for n in lengths:
        keys = make_keys(args.keys, args.heads, n, args.head_dim)
        queries = torch.randn(1, 2 * args.heads, args.window, args.head_dim)
        budget = max(args.window + 1, int(n * args.budget_fraction))
        sides = {"ours": lambda q=queries, k=keys: rkv_scores(q, k, args.window, kernel, lam),
                 "upstream": lambda q=queries, k=keys: upstream_style_scores(q, k, args.window, kernel, lam)}
        if n <= args.reference_max:
            sides["literal"] = lambda q=queries, k=keys: literal_scores(q, k, args.window, kernel, lam)
        c = compare(sides, "ours", repeat=args.rounds)
        ours_kept = rkv_select(queries, keys, budget, args.window, kernel_size=kernel, mix_lambda=lam)
        theirs_kept = upstream_style_kept(c.results["upstream"], budget, args.window)
        up = c.record("upstream")  # upstream / ours: the speed-up
        rec = {"length": n, "budget": budget, "ours_ms": c.sides["ours"].median * 1e3,
               "upstream_ms": c.sides["upstream"].median * 1e3,
               "upstream_max_abs_diff": (c.results["ours"] - c.results["upstream"]).abs().max().item(),
               "kept_overlap": kept_overlap(ours_kept, theirs_kept), "upstream": up}
        literal = "| (skipped) | "
        if "literal" in sides:
            lit = c.record("literal")
            rec.update(literal_ms=c.sides["literal"].median * 1e3, literal=lit,
                       literal_max_abs_diff=(c.results["ours"] - c.results["literal"]).abs().max().item())
            literal = f"| {rec['literal_ms']:.0f} | {lit['ratio']:.0f}x ({100 * lit['ratio_spread']:.0f} %) "
        records.append(rec)
        print(f"| {n} | {budget} | {rec['ours_ms']:.2f} | {rec['upstream_ms']:.2f} | {up['ratio']:.1f}x "
              f"({100 * up['ratio_spread']:.0f} %) | {rec['upstream_max_abs_diff']:.1e} | {rec['kept_overlap']:.3f} "
              f"{literal}| {c.flag()} |")
    if records:
        first, last = records[0]["upstream"], records[-1]["upstream"]
        print(f"threads {first['threads']}; {load_text(first['load_start'], last['load_end'])}")
    if args.json:
        write_output(args.json, json.dumps({"args": vars(args), "upstream": UPSTREAM, "records": records}, indent=1),
                     flag="--json")


if __name__ == "__main__":
    sys.exit(main())
