"""How much of one decoding step depends on the cache at all, for the models of benchmarks/streaming_speed.py.

    PYTHONPATH=$PWD python benchmarks/decode_profile.py --model pythia70m-random

Times a batch-1 decoding step with a plain cache of ``--cache`` tokens (no press: the ceiling configuration)
and with a cache of ``--small`` tokens, and the output head alone on one token (its weights are read from
memory once per step). What a step costs with an almost empty cache is the part no cache policy can remove;
the difference is all that eviction and compaction can act on.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from streaming_speed import build_model  # the same model builders as the speed benchmark

from kvpress_ext.cli.common import command_entry


def per_call_ms(fn, repeat: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat * 1000


@command_entry("decode_profile")
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m",
                    help="short name (smollm2-135m, stories260k), directory, hub id, or pythia70m-random / "
                         "llama1b-random (random weights of that shape) (default: %(default)s)")
    ap.add_argument("--cache", type=int, default=480)
    ap.add_argument("--small", type=int, default=8)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.model)
    cache = DynamicCache()
    prompt = torch.randint(3, model.config.vocab_size, (1, args.cache), generator=torch.Generator().manual_seed(0))
    model(input_ids=prompt, past_key_values=cache)
    token = torch.tensor([[5]])

    def step():
        model(input_ids=token, past_key_values=cache, logits_to_keep=1)
        cache.crop(args.cache)  # keep the cache length fixed

    step_ms = per_call_ms(step, args.steps)
    cache.crop(args.small)
    small_ms = per_call_ms(lambda: (model(input_ids=token, past_key_values=cache, logits_to_keep=1),
                                    cache.crop(args.small)), args.steps)
    head = model.get_output_embeddings()
    x = torch.randn(1, 1, head.in_features)
    head_ms = per_call_ms(lambda: head(x), args.steps)
    mib = head.weight.numel() * head.weight.element_size() / 2**20
    print(f"{args.model} (threads={torch.get_num_threads()}), ms per decoding step:")
    print(f"  cache of {args.cache} tokens: {step_ms:.2f}")
    print(f"  cache of {args.small} tokens:   {small_ms:.2f}  ({small_ms / step_ms:.0%} of it does not depend on the cache)")
    print(f"  output head alone ({mib:.0f} MiB of weights): {head_ms:.2f}")

if __name__ == "__main__":
    sys.exit(main())
