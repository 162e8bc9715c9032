"""R-KV's claim is throughput and memory on long generations: a bounded cache makes each decoding step attend
over (and copy) fewer keys. This measures it: greedy generation of ``--tokens`` tokens from a short random
prompt at each batch size, full cache against rkv and lazy_streaming at each budget, side by side in one run.

    PYTHONPATH=$PWD python benchmarks/rkv_throughput.py --tokens 4096 --output results/rkv_throughput.json
    PYTHONPATH=$PWD python benchmarks/rkv_throughput.py --model ../shared/models/stories260k --tokens 512

Configs: ``full`` (no press), ``rkv@B`` (``RKVPress(budget=B, compression_interval=--interval)``: the cache
is cut back to B every ``interval`` tokens once full) and ``lazy@B`` (``LazyStreamingPress(n_sink=4,
window=B-4, slack=--interval)``: the same bound, B .. B + interval, by position instead of by score).
All configs of a batch size run in one process on the same model and prompt, taking turns every ``--block``
tokens, so that a change in a shared machine's load hits them alike; ``--isolate`` runs each config in its
own process instead, one after another (then the peak memory is the config's own).

Reported per config: generated tokens/s over the whole decode (prefill excluded), peak memory (CUDA: peak
allocated; CPU: peak RSS of the process, model weights included; shared by the configs unless
``--isolate``), peak KV-cache bytes, the cache length every ``--sample_every`` steps
(``cache_length``: [tokens generated, cache length, this config's decode seconds so far]), and the share
of decode time spent in compression (``compress``: the scoring + gather / the compaction) and in the
press's hooks overall (``hooks``: rkv also buffers the last window's attention inputs at every step of
every layer).

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
from transformers import DynamicCache

from kvpress_ext.cli.common import command_entry
from kvpress_ext.core.apply import apply_press
from kvpress_ext.storage.safe_write import write_output

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


class Run:
    """One config at one batch size: its press (with timers on its hook and its compression), cache and
    progress; ``decode(n)`` generates n more tokens, timing only the model calls."""

    def __init__(self, model, config: str, args, sync):
        self.config, self.batch, self.sync = config, args.batch, sync
        self.press = build_press(config, args.interval)
        self.hooks, self.compress = [0.0], [0.0]
        if self.press is not None:  # instance attributes shadow the methods the hooks call
            name = "_compress" if hasattr(self.press, "_compress") else "_compact"
            setattr(self.press, name, _timed(getattr(self.press, name), self.compress, sync))
            name = "after_forward" if hasattr(self.press, "after_forward") else "forward_hook"
            setattr(self.press, name, _timed(getattr(self.press, name), self.hooks, sync))
        self.model, self.cache = model, DynamicCache()
        self.sample_every, self.done, self.decode_s, self.peak_len, self.lengths = args.sample_every, 0, 0.0, 0, []
        gen = torch.Generator().manual_seed(0)  # the same prompt for every config
        prompt = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt), generator=gen)
        with apply_press(self.press, model):
            out = model(input_ids=prompt.to(model.device), past_key_values=self.cache, logits_to_keep=1)
        self.token = out.logits[:, -1:].argmax(-1)
        self.hooks[0] = self.compress[0] = 0.0  # prefill excluded

    def decode(self, n: int) -> None:
        with apply_press(self.press, self.model):
            self.sync()
            start = time.perf_counter()
            for _ in range(n):
                out = self.model(input_ids=self.token, past_key_values=self.cache, logits_to_keep=1)
                self.token = out.logits[:, -1:].argmax(-1)
                self.done += 1
                length = self.cache.get_seq_length()
                self.peak_len = max(self.peak_len, length)
                if self.done % self.sample_every == 1 or self.sample_every == 1:
                    self.sync()
                    self.lengths.append([self.done, length, round(self.decode_s + time.perf_counter() - start, 4)])
            self.sync()
            self.decode_s += time.perf_counter() - start

    def result(self) -> dict:
        layers = self.cache.layers
        per_token = sum((x.keys.numel() + x.values.numel()) * x.keys.element_size() for x in layers)
        per_token /= layers[0].keys.shape[-2]
        self.lengths.append([self.done, self.cache.get_seq_length(), round(self.decode_s, 4)])
        return {
            "config": self.config, "batch": self.batch, "tokens": self.done,
            "tok_per_s": self.batch * self.done / self.decode_s, "decode_s": self.decode_s,
            "compress_s": self.compress[0], "compress_share": self.compress[0] / self.decode_s,
            "hooks_s": self.hooks[0], "hooks_share": self.hooks[0] / self.decode_s,
            "peak_cache_tokens": self.peak_len, "peak_kv_bytes": int(self.peak_len * per_token),
            "cache_length": self.lengths,
        }


def peak_memory(cuda: bool) -> int:
    if cuda:
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_configs(args, configs: list[str]) -> list[dict]:
    """Every config at ``args.batch`` in this process, round-robin in blocks of ``args.block`` tokens so that
    a change in the machine's load hits them all alike (with one config, the plain run)."""
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = build_model(args.model, args.device, getattr(torch, args.dtype))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    runs = [Run(model, config, args, sync) for config in configs]
    while runs[0].done < args.tokens:
        for run in runs:
            run.decode(min(args.block, args.tokens - run.done))
    results = [run.result() for run in runs]
    for r in results:
        r["peak_memory_bytes"] = peak_memory(cuda)
        r["peak_memory_kind"] = ("cuda_max_allocated" if cuda else "process_max_rss") + (
            "" if len(runs) == 1 else f", shared by the {len(runs)} configs of this process")
        r["load_avg_after"] = os.getloadavg()
    return results


@command_entry("rkv_throughput")
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
    ap.add_argument("--block", type=int, default=64, help="tokens each config decodes before the next one's turn")
    ap.add_argument("--isolate", action="store_true",
                    help="one process per config, one after another (its own peak memory; timings see load changes)")
    ap.add_argument("--output", default="", help="JSON file for all results")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one config
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_configs(args, [args.one])[0]))
        return
    budgets = [int(b) for b in args.budgets.split(",")]
    configs = args.configs.split(",") if args.configs else (
        ["full"] + [f"rkv@{b}" for b in budgets] + [f"lazy@{b}" for b in budgets])
    results = []
    for batch in [int(b) for b in args.batches.split(",")]:
        if not args.isolate:
            args.batch = batch
            batch_results = run_configs(args, configs)
        else:
            batch_results = []
            for config in configs:
                cmd = [sys.executable, __file__, "--one", config, "--batch", str(batch)]
                for key in ("model", "tokens", "prompt", "interval", "sample_every", "device", "dtype", "threads"):
                    cmd += [f"--{key}", str(getattr(args, key))]
                done = subprocess.run(cmd, check=False, capture_output=True, text=True)
                if done.returncode:
                    sys.stderr.write(done.stderr)
                    raise SystemExit(f"rkv_throughput: {config} at batch {batch} failed")
                batch_results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        for r in batch_results:
            results.append(r)
            print(f"batch {batch} {r['config']:>9}: {r['tok_per_s']:8.1f} tok/s  peak mem "
                  f"{r['peak_memory_bytes'] / 2**20:7.0f} MiB  peak KV {r['peak_kv_bytes'] / 2**20:7.1f} MiB "
                  f"({r['peak_cache_tokens']} tok)  compress {r['compress_share']:5.1%}  hooks {r['hooks_share']:5.1%}",
                  flush=True)
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
        write_output(args.output, json.dumps({"meta": meta, "results": results}, indent=1), flag="--output")


if __name__ == "__main__":
    sys.exit(main())
