"""Time to first token: A3 fusion from stored chunk caches vs a full prefill, timed with the shared helper.

    PYTHONPATH=. python benchmarks/a3_ttft.py --model smollm2-135m --lengths 2048 4096 7900 --threads 1
    PYTHONPATH=. python benchmarks/a3_ttft.py --layers 4 --lengths 2048 4096 8192          # random 1B shape
    PYTHONPATH=. python benchmarks/a3_ttft.py --device cuda --layers 16 --dtype bfloat16 --repeat 3

Both paths run in one process, interleaved, after a warm-up of each, ``--repeat`` rounds
(:func:`kvpress_ext.evaluation.timing.compare`); the ratio is the median per-round ratio with its spread, and a
measurement whose spread or load change is too large is marked unreliable; the ratio of the process's CPU seconds is
reported beside it (what the wall clock would show without waiting for a core on a shared machine). ``fusion`` is the whole
``fuse_result`` call (load + realign + fuse) measured from outside; ``load`` (fetching the stored entries) and
``realign`` (rotating them into the fused cache) are read from the last timed call.

Models: ``--model random-1b`` (default): hidden 2048, 32 heads, 8 KV heads, intermediate 8192 (Llama-3.2-1B
shape), ``--layers`` layers, random weights and random token ids; any other name (``smollm2-135m``) loads that
model and cuts the context from ``data/pride_and_prejudice.txt`` of the shared folder. Context = ``length``
tokens after BOS in chunks of ``--chunk`` tokens, then a question of about ``--question`` tokens, strategy
``debug`` (A3) at rate 0.15. The chunk caches are precomputed into a ChunkStore first (not part of TTFT); the
store keeps them resident (``memory_bytes``) unless ``--from_files``, which reads and verifies every entry from
disk on every call. Full prefill TTFT = one forward of BOS + context + question returning the last logits.
``--profile TOP`` runs one more call of each side under torch's profiler and records its TOP operators by self CPU
time (where a ratio's time goes, when a target is missed). Each row also says where the recomputed tokens sit
(``selected_mean_position`` as a fraction of the document, ``selected_in_last_quarter``) and the attention scores
a selective layer computes against a causal prefill's (``selective_scores_vs_causal``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from kvpress_ext.cli.common import command_entry
from kvpress_ext.evaluation.results import load_text
from kvpress_ext.evaluation.timing import compare, profile_call
from kvpress_ext.presses.a3 import A3Press, ChunkStore
from kvpress_ext.runtime.models import load_model
from kvpress_ext.storage.inputs import shared_dir
from kvpress_ext.storage.safe_write import write_output

QUESTION = "\n\nWhat did Elizabeth think of Mr. Darcy when they first met, and why? Answer in one sentence."


def selection_stats(selected: torch.Tensor, n_prefix: int, n_doc: int, n_question: int) -> dict:
    """Where the recomputed document tokens sit, and the attention scores their queries (with the question's) compute
    in one selective layer, as a share of a causal prefill's: the sum of their positions + 1 over N^2 / 2."""
    doc = selected.double()
    rows = torch.cat([doc + n_prefix, torch.arange(n_prefix + n_doc, n_prefix + n_doc + n_question).double()])
    total = n_prefix + n_doc + n_question
    return {"selected_mean_position": float(doc.mean() / n_doc),
            "selected_in_last_quarter": float((doc >= 0.75 * n_doc).double().mean()),
            "selective_scores_vs_causal": float((rows + 1).sum() / (total * total / 2))}


def build_random_model(layers: int, dtype):
    cfg = LlamaConfig(hidden_size=2048, num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=8192, vocab_size=32000, max_position_embeddings=16384, bos_token_id=1)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def contexts(args, tokenizer):
    """(bos id, {length: (chunks, question ids)}): random ids for the random model, book text otherwise."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(0)
        out = {}
        for length in args.lengths:
            chunks = [torch.randint(3, 32000, (args.chunk,), generator=g).tolist() for _ in range(length // args.chunk)]
            out[length] = (chunks, torch.randint(3, 32000, (args.question,), generator=g).tolist())
        return 1, out
    text = (shared_dir() / "data" / "pride_and_prejudice.txt").read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"][: args.question]
    out = {n: ([ids[i : min(i + args.chunk, n)] for i in range(0, n, args.chunk)], question) for n in args.lengths}
    return tokenizer.bos_token_id, out


@torch.no_grad()
def run(args):
    dtype = getattr(torch, args.dtype)
    if args.model == "random-1b":
        model, tokenizer = build_random_model(args.layers, dtype).to(args.device), None
    else:
        model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    bos, cases = contexts(args, tokenizer)
    rows = []
    for length, (chunks, q) in cases.items():
        root = tempfile.mkdtemp(prefix="a3-ttft-")
        t = time.perf_counter()
        ChunkStore(root, model, prefix_ids=[bos]).precompute(chunks)
        store_s = time.perf_counter() - t
        ids = torch.tensor([[bos] + [x for c in chunks for x in c] + q], device=args.device)
        resident = 0 if args.from_files else 1 << 40  # everything stays in memory after the warm-up
        press = A3Press(strategy=args.strategy, rate=args.rate,
                        store=ChunkStore(root, model, prefix_ids=[bos], memory_bytes=resident))
        sides = {"full": lambda ids=ids: model(input_ids=ids, logits_to_keep=1),
                 "fusion": lambda p=press, c=chunks, q=q: p.fuse_result(model, c, q)}
        c = compare(sides, "full", repeat=args.repeat, device=args.device)
        r = c.results["fusion"]
        wall = c.sides["fusion"].median
        row = {"model": args.model, "context": length, "tokens": ids.shape[1], "chunk": args.chunk,
               "layers": len(model.model.layers), "device": str(args.device), "dtype": args.dtype,
               "chunks_from": "files" if args.from_files else "memory", "strategy": args.strategy, "rate": args.rate,
               "full_s": c.sides["full"].median, "fusion_s": wall, "ratio": c.ratio("fusion"),
               "cpu_ratio": c.as_dict()["ratios"]["fusion"]["cpu_median"], "reliable": c.reliable,
               "load_s": r.timings["load_s"], "realign_s": r.timings["realign_s"], "fuse_s": r.timings["fuse_s"],
               "load_realign_share": (r.timings["load_s"] + r.timings["realign_s"]) / wall,
               "store_precompute_s": store_s, "selected": int(r.selected.numel()),
               **selection_stats(r.selected, r.n_prefix, sum(r.chunk_lengths), len(q)), "timing": c.as_dict()}
        if args.profile:
            row["profile"] = {side: profile_call(fn, args.profile) for side, fn in sides.items()}
            for side, ops in row["profile"].items():
                print(f"    {side}: " + ", ".join(f"{o['op']} {o['self_s']:.2f}s ({100 * o['share']:.0f} %)"
                                             for o in ops), flush=True)
        rows.append(row)
        print(f"{length:>6} tokens | full prefill {row['full_s']:7.3f}s | fusion {wall:7.3f}s (load {row['load_s']:6.3f}s"
              f" + realign {row['realign_s']:6.3f}s = {100 * row['load_realign_share']:.1f} %) | ratio "
              f"{c.summary('fusion')} | {load_text(c.loads[0], c.loads[-1])}", flush=True)
    return rows


@command_entry("a3_ttft")
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random-1b", help="random-1b or a model name (smollm2-135m)")
    ap.add_argument("--layers", type=int, default=16, help="layers of the random model")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--question", type=int, default=32)
    ap.add_argument("--rate", type=float, default=0.15)
    ap.add_argument("--strategy", default="debug")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds after the warm-up")
    ap.add_argument("--from_files", action="store_true", help="read every chunk from disk on every call")
    ap.add_argument("--profile", type=int, default=0, metavar="TOP",
                    help="after timing, profile one call of each side and record its TOP operators by self CPU time")
    ap.add_argument("--out", default="results/a3_ttft.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_output(args.out, json.dumps({"args": vars(args), "rows": rows, "threads": torch.get_num_threads()},
                                      indent=1), flag="--out")


if __name__ == "__main__":
    sys.exit(main())
