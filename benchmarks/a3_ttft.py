"""Time to first token: A3 fusion from stored chunk caches vs a full prefill, random Llama of ~1B shape.

    PYTHONPATH=. python benchmarks/a3_ttft.py --layers 4 --lengths 2048 4096 8192
    PYTHONPATH=. python benchmarks/a3_ttft.py --device cuda --layers 16 --dtype bfloat16 --repeat 3

On a GPU every timing is taken after ``torch.cuda.synchronize()`` and after one untimed warm-up of each path;
``--repeat`` keeps the best of several timed runs. ``fusion_wall_s`` is the whole ``fuse_result`` call
(load + realign + fuse) measured from outside.

Model: hidden 2048, 32 heads, 8 KV heads, intermediate 8192 (Llama-3.2-1B shape), random weights, float32
(faster than bfloat16 on this CPU), SDPA attention. Context = ``length / chunk`` chunks of ``chunk`` tokens
after BOS, question of ``question`` tokens, strategy ``debug`` (A3) at rate 0.15. The chunk caches are
precomputed into a ChunkStore first (not part of TTFT); fusion TTFT = loading them from disk (``load``)
+ fusion with selective recompute (``fuse``). Full prefill TTFT = one forward of BOS + context + question
returning the last logits. With fewer layers than 16, the 16-layer time is also extrapolated from the
per-layer costs (full-recompute layers below the selection layer, selective layers above).
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
from kvpress_ext.evaluation.results import machine_load
from kvpress_ext.presses.a3 import A3Press, ChunkStore
from kvpress_ext.storage.safe_write import write_output


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat: int):
    """(best wall seconds over ``repeat`` runs after one warm-up, last result), synchronised on a GPU."""
    fn()
    best, out = float("inf"), None
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best, out


def build_model(layers: int, dtype):
    cfg = LlamaConfig(hidden_size=2048, num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=8192, vocab_size=32000, max_position_embeddings=16384, bos_token_id=1)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


@torch.no_grad()
def run(args):
    dtype = getattr(torch, args.dtype)
    model = build_model(args.layers, dtype).to(args.device)
    g = torch.Generator().manual_seed(0)
    rows = []
    for length in args.lengths:
        chunks = [torch.randint(3, 32000, (args.chunk,), generator=g).tolist() for _ in range(length // args.chunk)]
        q = torch.randint(3, 32000, (args.question,), generator=g).tolist()
        root = tempfile.mkdtemp(prefix="a3-ttft-")
        t = time.perf_counter()
        ChunkStore(root, model).precompute(chunks)
        store_s = time.perf_counter() - t
        ids = torch.tensor([[1] + [x for c in chunks for x in c] + q], device=args.device)
        full_s, _ = timed(lambda ids=ids: model(input_ids=ids, logits_to_keep=1), args.device, args.repeat)
        press = A3Press(strategy=args.strategy, rate=args.rate, store=ChunkStore(root, model))
        wall_s, r = timed(lambda p=press, c=chunks, q=q: p.fuse_result(model, c, q), args.device, args.repeat)
        load_s, fuse_s = r.timings["load_s"], r.timings["fuse_s"]
        row = {"context": length, "layers": args.layers, "device": str(args.device), "dtype": args.dtype,
               "full_s": full_s, "load_s": load_s, "fuse_s": fuse_s, "fusion_ttft_s": load_s + fuse_s,
               "fusion_wall_s": wall_s, "ratio": wall_s / full_s,
               "realign_s": r.timings["realign_s"], "store_precompute_s": store_s, "selected": int(r.selected.numel())}
        if args.layers < 16 and args.layers > press.selection_layer + 1:
            f = full_s / args.layers  # one full layer
            n_full = press.selection_layer
            s = (fuse_s - n_full * f) / (args.layers - n_full)  # one selective layer
            row["ratio_16_layers_extrapolated"] = (load_s * 16 / args.layers + n_full * f + (16 - n_full) * s) / (16 * f)
        rows.append(row)
        print(f"{length:>6} tokens | full prefill {full_s:7.3f}s | fusion {wall_s:7.3f}s "
              f"(load {load_s:6.3f}s + fuse {fuse_s:6.3f}s, of which realign {row['realign_s']:6.3f}s) "
              f"| ratio {row['ratio']:.3f}"
              + (f" | 16-layer extrapolated {row['ratio_16_layers_extrapolated']:.3f}"
                 if "ratio_16_layers_extrapolated" in row else ""), flush=True)
    return rows


@command_entry("a3_ttft")
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--question", type=int, default=32)
    ap.add_argument("--rate", type=float, default=0.15)
    ap.add_argument("--strategy", default="debug")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs after a warm-up; the best is kept")
    ap.add_argument("--out", default="results/a3_ttft.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = machine_load()
    rows = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_output(args.out, json.dumps({"args": vars(args), "rows": rows, "threads": torch.get_num_threads(),
                                          "load_start": load_start, "load_end": machine_load()}, indent=1), flag="--out")


if __name__ == "__main__":
    sys.exit(main())
