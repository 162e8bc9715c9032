"""Time R-KV's selection (``rkv_select``: importance, redundancy, top-k) at the throughput benchmark's shape.

SmolLM2-135M's real keys and window queries are captured at each of its 30 layers' first decoding compression
(a prefill of ``--position`` tokens of the novel through ``rkv@512``, then decoding), tiled to ``--batch``
sequences: budget 512 + interval 128 = 640 keys, 3 KV heads, 9 query heads, head dim 64, float32. ``--baseline REV``
also times the scoring functions of ``kvpress_ext/presses/rkv.py`` at git revision REV, interleaved with the
current ones through :func:`kvpress_ext.evaluation.timing.compare` (warm-up, ``--rounds`` interleaved rounds;
the speed-up is the median per-round ratio with its spread, threads, load and the reliable flag), after checking
both keep the same tokens at every layer.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/rkv_compression.py --baseline d2c1290
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import types

import torch

from kvpress_ext.evaluation.results import load_text
from kvpress_ext.evaluation.throughput import Run, build_config
from kvpress_ext.evaluation.timing import compare
from kvpress_ext.presses import rkv
from kvpress_ext.runtime.models import load_model
from kvpress_ext.storage.inputs import shared_dir
from kvpress_ext.storage.safe_write import write_output


def capture(position: int, budget: int, interval: int) -> list:
    """(queries, keys) handed to ``rkv_select`` at every layer's first decoding compression, batch 1."""
    model, tokenizer = load_model("smollm2-135m", device="cpu", dtype="float32")
    text = (shared_dir() / "data" / "pride_and_prejudice.txt").read_text(encoding="utf-8")
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:position]])
    run = Run(f"rkv@{budget}", build_config(f"rkv@{budget}", interval, position), 1, position)
    run.prefill(model, ids)
    saved, select = [], rkv.rkv_select

    def spy(queries, keys, *args, **kwargs):
        saved.append((queries.clone(), keys.clone()))
        return select(queries, keys, *args, **kwargs)

    rkv.rkv_select = spy
    try:
        run.decode(model, interval + 1, timed=False)
    finally:
        rkv.rkv_select = select
    return saved[: model.config.num_hidden_layers]


def baseline(rev: str) -> types.ModuleType:
    """The scoring functions of rkv.py at ``rev`` (the module up to its press class)."""
    source = subprocess.run(["git", "show", f"{rev}:kvpress_ext/presses/rkv.py"], check=True, capture_output=True,
                            text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source[: source.index("@dataclass\nclass _LayerState")])
    spec = importlib.util.spec_from_file_location("rkv_baseline", f.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.unlink(f.name)
    return module


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--position", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--budget", type=int, default=512)
    p.add_argument("--interval", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--baseline", default=None, help="git revision whose rkv_select to compare with")
    p.add_argument("--json", default=None, help="JSON file for the speed-up record (with --baseline)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    layers = [(q.repeat(args.batch, 1, 1, 1), k.repeat(args.batch, 1, 1, 1))
              for q, k in capture(args.position, args.budget, args.interval)]
    impls = {"current": rkv}
    if args.baseline:
        impls[f"at {args.baseline}"] = baseline(args.baseline)
        for q, k in layers:
            kept = [m.rkv_select(q, k, args.budget, 8) for m in impls.values()]
            if not torch.equal(*kept):
                print("the two revisions keep different tokens", file=sys.stderr)
                return 1
    def side(module):
        return lambda: [module.rkv_select(q, k, args.budget, 8) for q, k in layers]

    c = compare({name: side(module) for name, module in impls.items()}, "current", repeat=args.rounds)
    print(f"keys {tuple(layers[0][1].shape)} x {len(layers)} layers, threads {c.threads}, "
          f"{load_text(c.loads[0], c.loads[-1])}")
    for name, t in c.sides.items():
        print(f"{name:>16}: {t.median / len(layers) * 1e3:.1f} ms per layer (best {t.best / len(layers) * 1e3:.1f}, "
              f"spread {100 * t.spread:.0f} %)")
    if args.baseline:
        r = c.record(f"at {args.baseline}")  # baseline / current: the speed-up
        print(f"median of {args.rounds} rounds: {r['ratio']:.2f}x faster than at {args.baseline} (per-round spread "
              f"{100 * r['ratio_spread']:.0f} %, of best {r['ratio_of_best']:.2f}x); {c.flag()}")
        if args.json:
            write_output(args.json, json.dumps({"args": vars(args), "speedup": r, "timing": c.as_dict()}, indent=1),
                         flag="--json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
