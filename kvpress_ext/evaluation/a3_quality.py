"""A3 fusion quality against a full prefill, on stories260k and TinyStories (library part of
``evaluation/a3_quality.py``).

Each sample: ``n_chunks`` consecutive validation stories (each cut to ``chunk_tokens``) are the
documents, the first ``question_tokens`` of the story that follows are the "question". For every
strategy and rate we fuse the chunk caches and compare the next-token distributions at the question
tokens with those of a full prefill of ``BOS + chunks + question``: KL(full || fused) (nats per token)
and top-1 agreement. ``attnlink`` uses the last token of each chunk and the last question token as sinks.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from kvpress_ext.presses.a3 import STRATEGIES, A3Press, ChunkStore
from kvpress_ext.storage.inputs import shared_dir
from kvpress_ext.storage.safe_write import save_figure


def load_samples(tokenizer, n_samples: int, n_chunks: int, chunk_tokens: int, question_tokens: int, path=None):
    text = Path(path or shared_dir() / "data" / "tinystories_val.txt").read_text()
    stories = [s.strip() for s in text.split("\n\n") if s.strip()]
    encoded = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in stories]
    encoded = [e for e in encoded if len(e) >= question_tokens]
    samples, i = [], 0
    while len(samples) < n_samples and i + n_chunks < len(encoded):
        chunks = [e[:chunk_tokens] for e in encoded[i : i + n_chunks]]
        samples.append((chunks, encoded[i + n_chunks][:question_tokens]))
        i += n_chunks + 1
    return samples


def distribution_agreement(full_logits: torch.Tensor, fused_logits: torch.Tensor) -> tuple[float, float]:
    """KL(full || fused) in nats, averaged over tokens, and the fraction of tokens whose argmax agrees.

    Both are (n_tokens, vocab) next-token logits at the same positions (the question tokens)."""
    logp_full = full_logits.float().log_softmax(-1)
    logp = fused_logits.float().log_softmax(-1)
    kl = (logp_full.exp() * (logp_full - logp)).sum(-1).mean().item()
    top1 = (logp.argmax(-1) == logp_full.argmax(-1)).float().mean().item()
    return kl, top1


@torch.no_grad()
def evaluate(model, tokenizer, rates=(0.0, 0.05, 0.15, 0.3, 1.0), strategies=STRATEGIES, n_samples=12, n_chunks=4,
             chunk_tokens=96, question_tokens=48, store_dir=None, seed=0):
    """Returns rows ``{strategy, rate, kl, top1, n}`` averaged over samples (and question tokens)."""
    store = ChunkStore(store_dir or tempfile.mkdtemp(prefix="a3-quality-"), model, tokenizer, save_surprisal=True)
    samples = load_samples(tokenizer, n_samples, n_chunks, chunk_tokens, question_tokens)
    bos = store.prefix_ids
    acc = {}
    for chunks, q in samples:
        full = model(torch.tensor([bos + [t for c in chunks for t in c] + q])).logits[0, -len(q):].float()
        offsets, sinks = len(bos), []
        for c in chunks:
            offsets += len(c)
            sinks.append(offsets - 1)
        sinks.append(offsets + len(q) - 1)
        for strategy in strategies:
            for rate in rates:
                press = A3Press(strategy=strategy, rate=rate, store=store, seed=seed,
                                sink_positions=sinks if strategy == "attnlink" else None)
                _, logits = press.fuse(model, chunks, q)
                kl, top1 = distribution_agreement(full, logits)
                a = acc.setdefault((strategy, rate), [0.0, 0.0, 0])
                a[0] += kl
                a[1] += top1
                a[2] += 1
    return [{"strategy": s, "rate": r, "kl": v[0] / v[2], "top1": v[1] / v[2], "n": v[2]} for (s, r), v in acc.items()]


def markdown_table(rows, rates) -> str:
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    by = {(r["strategy"], r["rate"]): r for r in rows}
    head = "| strategy | " + " | ".join(f"KL @ {r}" for r in rates) + " | " + " | ".join(f"top-1 @ {r}" for r in rates)
    lines = [head + " |", "|---" * (1 + 2 * len(rates)) + "|"]
    for s in strategies:
        kls = " | ".join(f"{by[(s, r)]['kl']:.4f}" for r in rates)
        tops = " | ".join(f"{by[(s, r)]['top1']:.3f}" for r in rates)
        lines.append(f"| {s} | {kls} | {tops} |")
    return "\n".join(lines)


def plot(rows, rates, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for s in dict.fromkeys(r["strategy"] for r in rows):
        pts = sorted((r["rate"], r["kl"], r["top1"]) for r in rows if r["strategy"] == s)
        axes[0].plot([p[0] for p in pts], [max(p[1], 1e-7) for p in pts], marker="o", label=s)
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=s)
    axes[0].set(yscale="log", xlabel="rate (fraction of document tokens recomputed)", ylabel="KL(full || fused), nats",
                title="A3 fusion vs full prefill (stories260k)")
    axes[1].set(xlabel="rate", ylabel="top-1 agreement", title="next-token top-1 agreement")
    axes[0].legend(fontsize=8)
    fig.tight_layout()

    save_figure(fig, path, dpi=120)
