"""Each method of kvpress-ext in a few lines, on SmolLM2-135M-Instruct by default (CPU, a minute or two; stories260k: seconds).

    python examples/quickstart.py [--model smollm2-135m|stories260k|PATH|HUB_ID] [--stream_tokens 1000]

1. any registered press through the pipeline (here SnapKV by name, and R-KV compressing while decoding);
2. Lazy-Pruning StreamingLLM: generate with ``model.generate`` while the cache stays under ``cap_total``;
3. A³ fusion: answer from separately stored chunk caches, compared with a full prefill.

The pipeline and A³ use the model's chat template when it has one (question asked after the context).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
from transformers import DynamicCache, pipeline
from transformers.utils import logging as hf_logging

import kvpress_ext
from kvpress_ext.cli.common import OneLineArgumentParser, command_entry
from kvpress_ext.presses.a3 import A3Press, ChunkStore
from kvpress_ext.presses.lazy_streaming import LazyStreamingPress
from kvpress_ext.presses.rkv import RKVPress
from kvpress_ext.runtime.models import load_model
from kvpress_ext.runtime.threads import DEFAULT_THREADS, set_threads

SHARED = Path(os.environ.get("KVPRESS_EXT_SHARED", Path(__file__).resolve().parents[2] / "shared"))


@command_entry("quickstart")
def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="short name, local path or hub id")
    parser.add_argument("--stream_tokens", type=int, default=1000, help="tokens generated under lazy_streaming")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch CPU threads")
    args = parser.parse_args(argv)
    hf_logging.disable_progress_bar()  # no "Loading weights" bar per tensor
    set_threads(args.threads)
    torch.manual_seed(0)
    try:  # a bad --model (missing directory, hub id offline, unsupported architecture): one line, exit 2
        model, tokenizer = load_model(args.model, device="cpu")  # a short name, a directory or a hub id
    except kvpress_ext.KVPressExtError as exc:
        print(f"quickstart.py: error: {exc}", file=sys.stderr)
        return 2
    text = (SHARED / "data" / "tinystories_val.txt").read_text()
    story = text[: text.index("\n\n", 1000)] if "\n\n" in text[1000:3000] else text[:1200]  # ~300 tokens
    question = "What happens next in the story?"

    # 1. Any press by name (or as an object) through the pipeline.
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    snap = kvpress_ext.get_press("snapkv", compression_ratio=0.5)
    print("snapkv 0.5:", pipe(story, question=question, press=snap, max_new_tokens=20)["answer"])
    rkv = RKVPress(budget=32, window_size=8, compression_interval=16)  # compresses while it decodes
    print("rkv budget 32:", pipe(story, question=question, press=rkv, max_new_tokens=40)["answer"])

    # 2. Lazy-Pruning StreamingLLM with plain model.generate: the cache never above cap_total.
    press = LazyStreamingPress(cap_total=128, slack=16)
    cache = DynamicCache()
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    n = args.stream_tokens
    with torch.no_grad(), press(model):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=tokenizer.eos_token_id,
                             past_key_values=cache, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    print(f"lazy_streaming: generated {out.shape[1] - ids.shape[1]} tokens; cache holds {cache.get_seq_length()} "
          f"(cap_total {press.max_cache}); tail: ...{tokenizer.decode(out[0, -30:])!r}")

    # 3. A³: chunk caches computed once and stored, fused at question time (rate 1.0 would equal a full prefill).
    chunks = ["Tom had a red ball. He liked to throw it high.", "His dog Max ran after the ball every day.",
              "One day the ball fell in the pond."]
    with tempfile.TemporaryDirectory() as root:
        a3 = A3Press(strategy="debug", rate=0.3, store=ChunkStore(root, model, tokenizer))
        fused = pipe(context_chunks=chunks, question="Where did the ball fall?", press=a3, max_new_tokens=12)["answer"]
        full = pipe(" ".join(chunks), question="Where did the ball fall?", max_new_tokens=12)["answer"]
    print(f"a3 debug 0.3: {fused!r}\nfull prefill: {full!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
