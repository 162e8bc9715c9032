"""R-KV's claim is throughput and memory on long generations: a bounded cache makes each decoding step attend
over (and copy) fewer keys. This measures it: greedy generation of ``--tokens`` tokens from a short random
prompt at each batch size, full cache against rkv and lazy_streaming at each budget, side by side in one run.

    PYTHONPATH=$PWD python benchmarks/rkv_throughput.py --tokens 4096 --output results/rkv_throughput.json
    PYTHONPATH=$PWD python benchmarks/rkv_throughput.py --model ../shared/models/stories260k --tokens 512

Configs: ``full`` (no press), ``rkv@B`` (``RKVPress(budget=B, compression_interval=--interval)``: the cache
is cut back to B every ``interval`` tokens once full) and ``lazy@B`` (``LazyStreamingPress(n_sink=4,
window=B-4, slack=--interval)``: the same bound, B .. B + interval, by position instead of by score).
Each config runs in its own process (so its peak resident memory is its own) on the same model and prompt.

Reported per config: generated tokens/s over the whole decode (prefill excluded), peak memory (CUDA: peak
allocated; CPU: peak RSS of the process, model weights included), peak KV-cache bytes, the cache length
every ``--sample_every`` steps (``cache_length``: [tokens generated, cache length, seconds since the decode
started]), and the share of decode time spent in compression (``compress``: the
scoring + gather / the compaction) and in the press's hooks overall (``hooks``: rkv also buffers the last
window's queries at every step of every layer).

``--model``: a local model directory, or the default ``smollm2-135m-random``, a random-weight model of
SmolLM2-135M's shape (30 layers, hidden 576, 9 heads, 3 KV heads, head_dim 64, vocab 49152).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

SMOLLM2_135M_SHAPE = {
    "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "rope_theta": 100000.0,
    "tie_word_embeddings": True, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
    "bos_token_id": 1, "eos_token_id": 2,
}


def build_model(name: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    if name == "smollm2-135m-random":
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2_135M_SHAPE), dtype=dtype)
    elif Path(name).is_dir():
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    else:
        raise SystemExit(f"rkv_throughput: --model {name!r} is neither 'smollm2-135m-random' nor a local directory")
    return model.to(device).eval()


def build_press(config: str, interval: int):
    from kvpress_ext.presses.lazy_streaming import LazyStreamingPress
    from kvpress_ext.presses.rkv import RKVPress

    if config == "full":
        return None
    kind, budget = config.split("@")
    if kind == "rkv":
        return RKVPress(budget=int(budget), compression_interval=interval)
    if kind == "lazy":
        return LazyStreamingPress(n_sink=4, window=int(budget) - 4, slack=interval)
    raise SystemExit(f"rkv_throughput: unknown config {config!r} (full, rkv@B, lazy@B)")


def _timed(fn, bucket: list, sync):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        sync()
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            sync()
            bucket[0] += time.perf_counter() - t

    return wrapper


def run_one(args) -> dict:
    """One config at one batch size, in this process."""
    from transformers import DynamicCache

    from kvpress_ext.apply import apply_press

    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = build_model(args.model, device, getattr(torch, args.dtype))
    press = build_press(args.one, args.interval)
    hooks, compress = [0.0], [0.0]
    if press is not None:  # instance attributes shadow the methods the hooks call
        name = "_compress" if hasattr(press, "_compress") else "_compact"
        setattr(press, name, _timed(getattr(press, name), compress, sync))
        name = "after_forward" if hasattr(press, "after_forward") else "forward_hook"
        setattr(press, name, _timed(getattr(press, name), hooks, sync))
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt), generator=gen).to(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    cache = DynamicCache()
    lengths, peak_len = [], 0
    with apply_press(press, model):
        out = model(input_ids=prompt, past_key_values=cache, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        hooks[0] = compress[0] = 0.0  # prefill excluded
        sync()
        start = time.perf_counter()
        for step in range(args.tokens):
            out = model(input_ids=token, past_key_values=cache, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)
            n = cache.get_seq_length()
            peak_len = max(peak_len, n)
            if step % args.sample_every == 0 or step == args.tokens - 1:
                sync()
                lengths.append([step + 1, n, round(time.perf_counter() - start, 4)])
        sync()
        decode_s = time.perf_counter() - start
    layer = cache.layers[0]
    kv_bytes_per_token = sum(
        (lay.keys.numel() + lay.values.numel()) * lay.keys.element_size() for lay in cache.layers
    ) / layer.keys.shape[-2]
    return {
        "config": args.one, "batch": args.batch, "tokens": args.tokens, "prompt": args.prompt,
        "tok_per_s": args.batch * args.tokens / decode_s, "decode_s": decode_s,
        "compress_s": compress[0], "compress_share": compress[0] / decode_s,
        "hooks_s": hooks[0], "hooks_share": hooks[0] / decode_s,
        "peak_cache_tokens": peak_len, "peak_kv_bytes": int(peak_len * kv_bytes_per_token),
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_memory_kind": "cuda_max_allocated" if cuda else "process_max_rss",
        "cache_length": lengths,
        "load_avg_after": os.getloadavg(),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-random")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens generated per sequence")
    ap.add_argument("--prompt", type=int, default=64, help="random prompt tokens per sequence")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--budgets", default="256,512,1024")
    ap.add_argument("--configs", default="", help="comma list overriding the default (full, rkv@B, lazy@B)")
    ap.add_argument("--interval", type=int, default=128, help="rkv compression_interval = lazy slack")
    ap.add_argument("--sample_every", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--output", default="", help="JSON file for all results")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one config
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return
    budgets = [int(b) for b in args.budgets.split(",")]
    configs = args.configs.split(",") if args.configs else (
        ["full"] + [f"rkv@{b}" for b in budgets] + [f"lazy@{b}" for b in budgets])
    results = []
    for batch in [int(b) for b in args.batches.split(",")]:
        for config in configs:
            cmd = [sys.executable, __file__, "--one", config, "--batch", str(batch)]
            for key in ("model", "tokens", "prompt", "interval", "sample_every", "device", "dtype", "threads"):
                cmd += [f"--{key}", str(getattr(args, key))]
            done = subprocess.run(cmd, check=False, capture_output=True, text=True)
            if done.returncode:
                sys.stderr.write(done.stderr)
                raise SystemExit(f"rkv_throughput: {config} at batch {batch} failed")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(r)
            print(f"batch {batch} {config:>9}: {r['tok_per_s']:8.1f} tok/s  peak mem {r['peak_memory_bytes'] / 2**20:7.0f}"
                  f" MiB  peak KV {r['peak_kv_bytes'] / 2**20:7.1f} MiB ({r['peak_cache_tokens']} tok)  compress "
                  f"{r['compress_share']:5.1%}  hooks {r['hooks_share']:5.1%}", flush=True)
    print()
    print("| batch | config | tok/s | x full | peak memory (MiB) | peak KV (MiB) | peak cache (tokens) | "
          "compression share | hook share |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        full = next((f for f in results if f["batch"] == r["batch"] and f["config"] == "full"), None)
        ratio = f"{r['tok_per_s'] / full['tok_per_s']:.2f}" if full else ""
        print(f"| {r['batch']} | {r['config']} | {r['tok_per_s']:.1f} | {ratio} | {r['peak_memory_bytes'] / 2**20:.0f} | "
              f"{r['peak_kv_bytes'] / 2**20:.1f} | {r['peak_cache_tokens']} | {r['compress_share']:.1%} | "
              f"{r['hooks_share']:.1%} |")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        meta = {"command": " ".join(sys.argv), "model": args.model, "device": args.device, "dtype": args.dtype,
                "torch": torch.__version__, "threads": args.threads or torch.get_num_threads(),
                "date": time.strftime("%Y-%m-%d %H:%M")}
        Path(args.output).write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
