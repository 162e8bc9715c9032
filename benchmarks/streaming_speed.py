"""Decode throughput of StreamingLLM caches at one ``cap_total``: dense, ceiling, eager, lazy, kvpress.

* dense: growing cache, no eviction, decoding from a short prompt (``--steps`` tokens).
* ceiling(s): a plain cache held at lazy(s)'s average length (cap_total - s/2), no eviction: the
  speed lazy pruning could reach if compaction were free.
* eager: lazy_streaming with slack=0 (evict + re-rotate at every token).
* lazy(s): lazy_streaming with slack s.
* kvpress: kvpress's StreamingLLMPress wrapped in KeyRerotationPress, re-applied after every decoding
  step (kvpress's DecodingPress only takes ScorerPress, so a small hook drives it per step).

Each config starts from a cache already at cap_total (steady state) and is timed over ``--steps``
greedy tokens per round; configs run interleaved for ``--rounds`` rounds through
:func:`kvpress_ext.evaluation.timing.compare` (warm-up round first, order alternating); tok/s is the median, and
lazy/eager the median per-round ratio with its spread, threads, load before and after and the reliable flag.
``--batch B`` decodes B streams at once: on a CPU a small model at batch 1 is bound by reading its
weights, and more streams per weight read make the cache work dominate (see docs/results/streaming.md).
``--rss_tokens N`` instead records resident memory while lazy (or dense) decodes N tokens.

    PYTHONPATH=$PWD python benchmarks/streaming_speed.py --model stories260k
    PYTHONPATH=$PWD python benchmarks/streaming_speed.py --model pythia70m-random --steps 256
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from kvpress import BasePress, KeyRerotationPress, StreamingLLMPress
from transformers import DynamicCache

from kvpress_ext.cli.common import command_entry
from kvpress_ext.core.apply import apply_press
from kvpress_ext.core.contract import PressContract
from kvpress_ext.core.positions import set_next_position
from kvpress_ext.evaluation.results import load_text, machine_load
from kvpress_ext.evaluation.timing import compare
from kvpress_ext.presses.lazy_streaming import LazyStreamingPress, chunked_prefill
from kvpress_ext.storage.safe_write import write_output


@dataclass
class KvpressStreamingPerStep(BasePress):
    """kvpress's KeyRerotationPress(StreamingLLMPress) applied after every forward once the cache passes cap_total."""

    cap_total: int = 512
    n_sink: int = 4
    inner: KeyRerotationPress = field(init=False)
    contract: ClassVar[PressContract] = PressContract(prefill=True, decoding=True)

    def __post_init__(self):
        self.inner = KeyRerotationPress(StreamingLLMPress(n_sink=self.n_sink))

    def __call__(self, model):
        return apply_press(self, model)

    def forward_hook(self, module, input, kwargs, output):
        cache = kwargs["past_key_values"]
        layer = cache.layers[module.layer_idx]
        length = layer.keys.shape[-2]
        if length > self.cap_total:
            self.inner.compression_ratio = (length - self.cap_total - 0.5) / length  # keeps exactly cap_total
            layer.keys, layer.values = self.inner.compress(
                module, kwargs["hidden_states"], layer.keys, layer.values, None, kwargs
            )
            set_next_position(cache, self.cap_total)
        return output


SYNTHETIC = ("pythia70m-random", "llama1b-random")


def build_model(name: str):
    """A synthetic shape (random weights) or any model :func:`kvpress_ext.load_model` takes (a short name such as
    smollm2-135m or stories260k, a directory, a hub id)."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig

    if name not in SYNTHETIC:
        from kvpress_ext.core.errors import KVPressExtError
        from kvpress_ext.runtime.models import load_model

        try:
            return load_model(name, device="cpu", attn_implementation="sdpa")[0]
        except KVPressExtError as exc:
            raise SystemExit(f"error: {exc}") from None
    torch.manual_seed(0)
    if name == "pythia70m-random":
        cfg = GPTNeoXConfig(vocab_size=50304, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                            intermediate_size=2048, rotary_pct=0.25, max_position_embeddings=2048)
    elif name == "llama1b-random":
        cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                          num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096)
    else:
        raise SystemExit(f"unknown model {name}")
    cfg._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(cfg).eval()


class Stream:
    """One config's cache, prefilled once (untimed) with ``prompt_len`` tokens per stream through ``press``; each
    :meth:`round` decodes ``steps`` tokens. Without a press the cache is cropped back to ``prompt_len`` first, so a
    ceiling config stays at its length and dense decodes from its short prompt every round."""

    def __init__(self, model, press, prompt_len: int, vocab: int, batch: int = 1):
        self.model, self.press, self.prompt_len = model, press, prompt_len
        self.cache = DynamicCache()
        prompt = torch.randint(3, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
        with apply_press(press, model):
            chunk = press.prefill_chunk_size if isinstance(press, LazyStreamingPress) else prompt_len
            out = chunked_prefill(model, prompt, self.cache, max(chunk, 64))
        self.first = self.token = out.logits[:, -1:].argmax(-1)

    def round(self, steps: int) -> None:
        if self.press is None:
            self.cache.crop(self.prompt_len)
            self.token = self.first
        with apply_press(self.press, self.model):
            for _ in range(steps):
                self.token = self.model(input_ids=self.token, past_key_values=self.cache,
                                        logits_to_keep=1).logits[:, -1:].argmax(-1)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_run(model, press, tokens: int, every: int, vocab: int) -> dict:
    cache = DynamicCache()
    samples = []
    token = torch.tensor([[5]])
    with apply_press(press, model):
        for i in range(tokens):
            token = model(input_ids=token, past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
            if (i + 1) % every == 0:
                samples.append({"tokens": i + 1, "rss_mb": round(rss_mb(), 1), "cache_len": cache.get_seq_length()})
    growth = samples[-1]["rss_mb"] - samples[0]["rss_mb"] if samples else 0.0
    return {"samples": samples, "rss_growth_mb_after_first_sample": round(growth, 1),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


@command_entry("streaming_speed")
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help=f"short name (smollm2-135m, stories260k), directory, hub id, or {' / '.join(SYNTHETIC)} "
                        "(random weights of that shape) (default: %(default)s)")
    # The dashed spellings are the former names, kept so recorded commands still run.
    p.add_argument("--cap_total", "--cap-total", type=int, default=512, help="most tokens in the cache")
    p.add_argument("--slacks", default="16,64,256")
    p.add_argument("--steps", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=1,
                   help="streams decoded together (tok/s counts all of them); more streams = more cache work per weight read")
    p.add_argument("--no_dense", "--no-dense", action="store_true", help="skip the dense (no eviction) baseline")
    p.add_argument("--rss_tokens", "--rss-tokens", type=int, default=0,
                   help="instead of speed: resident memory while decoding this many tokens")
    p.add_argument("--rss_press", "--rss-press", default="lazy", choices=["lazy", "dense"],
                   help="what decodes in the --rss_tokens run")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = machine_load()  # recorded in the JSON: timings on a busy machine are not comparable with idle ones
    model = build_model(args.model)
    vocab = model.config.vocab_size
    C = args.cap_total
    slacks = [int(s) for s in args.slacks.split(",")]

    if args.rss_tokens:
        press = LazyStreamingPress(cap_total=C, slack=slacks[len(slacks) // 2]) if args.rss_press == "lazy" else None
        result = rss_run(model, press, args.rss_tokens, max(1, args.rss_tokens // 10), vocab)
        result.update(model=args.model, press=repr(press), tokens=args.rss_tokens, threads=torch.get_num_threads(),
                      load_start=load_start, load_end=machine_load())
        print(json.dumps(result))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            write_output(args.json, json.dumps(result, indent=1), flag="--json")
        return

    configs = {}
    if not args.no_dense:
        configs["dense"] = (None, 16)
    configs["eager"] = (LazyStreamingPress(cap_total=C, slack=0), C)
    for s in slacks:
        configs[f"lazy{s}"] = (LazyStreamingPress(cap_total=C, slack=s), C)
        configs[f"ceiling{s}"] = (None, C - s // 2 - args.steps // 2)
    configs["kvpress"] = (KvpressStreamingPerStep(cap_total=C), C)
    streams = {name: Stream(model, press, max(1, prompt_len), vocab, args.batch)
               for name, (press, prompt_len) in configs.items()}
    c = compare({name: (lambda st=st: st.round(args.steps)) for name, st in streams.items()}, "eager",
                repeat=args.rounds)
    times = {k: [t / args.steps for t in v.seconds] for k, v in c.sides.items()}
    tps = {k: args.batch / statistics.median(v) for k, v in times.items()}
    print(f"model={args.model} cap_total={C} batch={args.batch} steps={args.steps} rounds={args.rounds} "
          f"threads={c.threads}; {load_text(c.loads[0], c.loads[-1])}")
    print(f"{'config':>12} {'tok/s':>9}")
    for k, v in tps.items():
        print(f"{k:>12} {v:9.1f}")
    ratios = {}
    print(f"{'slack':>6} {'lazy/eager (spread)':>20} {'lazy/ceiling':>13} {'lazy/kvpress':>13}")
    for s in slacks:
        lz, per_round = tps[f"lazy{s}"], c.record(f"lazy{s}")
        ratios[f"lazy{s}"] = {"x_eager": per_round, "x_ceiling": c.between(f"ceiling{s}", f"lazy{s}"),
                              "x_kvpress": c.between("kvpress", f"lazy{s}")}
        print(f"{s:>6} {per_round['speedup']:10.2f} ({100 * per_round['speedup_spread']:3.0f} %) "
              f"{lz / tps[f'ceiling{s}']:13.3f} {lz / tps['kvpress']:13.2f}")
    print(c.flag())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_output(args.json, json.dumps({"args": vars(args), "tokens_per_s": tps, "seconds": times,
                                            "ratios": ratios, "timing": c.as_dict(), "threads": c.threads,
                                            "load_start": c.loads[0], "load_end": c.loads[-1],
                                            "reliable": c.reliable, "reasons": c.reasons}, indent=1), flag="--json")


if __name__ == "__main__":
    sys.exit(main())
