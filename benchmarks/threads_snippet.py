"""Torch's default CPU threads against ``kvpress_ext.set_threads(1)`` on the README's second Python snippet.

Why: the README tells Python users to call ``set_threads``; this measures the reason on the code they run (R-KV
through the pipeline, then lazy streaming under ``model.generate``, on stories260k). Both settings run in this one
process, interleaved round by round after an untimed warm-up; medians and the spread are printed with the load
average.

    KVPRESS_EXT_SHARED=../shared python benchmarks/threads_snippet.py --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from transformers import DynamicCache, pipeline

import kvpress_ext
from kvpress_ext.evaluation.results import machine_load
from kvpress_ext.presses.lazy_streaming import LazyStreamingPress
from kvpress_ext.presses.rkv import RKVPress
from kvpress_ext.storage.inputs import shared_dir

CONTEXT = ("Once upon a time, there was a little girl named Lily. She had a red ball and a small dog called Max. "
           "Every morning Lily threw the ball across the garden and Max ran to bring it back. One day the ball "
           "rolled under the old fence and into the field next door, where a big brown cow was eating grass.")


def snippet(pipe, new_tokens: int) -> float:
    """Seconds for the README's second snippet with ``new_tokens`` in place of its 1,000."""
    start = time.perf_counter()
    pipe(CONTEXT, question=" Max", press=RKVPress(budget=64), max_new_tokens=200)
    model, tokenizer = pipe.model, pipe.tokenizer
    input_ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    with LazyStreamingPress(cap_total=128, slack=16)(model):
        model.generate(input_ids, attention_mask=input_ids.ne(-1), past_key_values=DynamicCache(),
                       max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=tokenizer.eos_token_id)
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per setting (median reported)")
    p.add_argument("--new_tokens", type=int, default=1000, help="lazy-streaming tokens generated (README: 1,000)")
    args = p.parse_args(argv)
    default = torch.get_num_threads()  # torch's own choice, before anything sets it
    pipe = pipeline("kv-press-text-generation", model=str(shared_dir() / "models" / "stories260k"))
    settings = {f"torch default ({default})": default, "set_threads(1)": 1}
    times = {name: [] for name in settings}
    for threads in settings.values():  # untimed warm-up
        kvpress_ext.set_threads(threads)
        snippet(pipe, 32)
    start = machine_load()
    for _ in range(args.rounds):
        for name, threads in settings.items():
            kvpress_ext.set_threads(threads)
            times[name].append(snippet(pipe, args.new_tokens))
    end = machine_load()
    for name, runs in times.items():
        print(f"{name:18s} median {statistics.median(runs):6.1f} s  (runs {', '.join(f'{t:.1f}' for t in runs)})")
    print(f"load average {start['loadavg_1m']} -> {end['loadavg_1m']} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
