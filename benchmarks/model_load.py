"""Load time of every registered model short name, cold (first use: locate / convert into an empty model cache)
and cached (the second use), with the facts ``docs/results/models.md`` tabulates (parameters, context, layers,
heads, chat template).

Each measurement runs in a fresh Python process and times ``kvpress_ext.load_model(name)`` only (imports are done
before the clock starts). "Cold" points ``KVPRESS_EXT_CACHE`` at an empty temporary folder, so a model that needs a
conversion converts; "cached" repeats the load with the same folder.

    PYTHONPATH=$PWD python benchmarks/model_load.py --repeat 3 --json results/model_load.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from kvpress_ext.cli.common import command_entry
from kvpress_ext.storage.safe_write import write_output

CHILD = r"""
import json, sys, time
import torch
import kvpress_ext
from kvpress_ext.runtime.models import resolve_model
torch.set_num_threads(int(sys.argv[2]))
t0 = time.perf_counter()
model, tok = kvpress_ext.load_model(sys.argv[1], device="cpu")
seconds = time.perf_counter() - t0
c = model.config
print(json.dumps({"seconds": seconds, "path": resolve_model(sys.argv[1]),
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "context": getattr(c, "max_position_embeddings", None), "layers": c.num_hidden_layers,
                  "heads": c.num_attention_heads, "kv_heads": getattr(c, "num_key_value_heads", c.num_attention_heads),
                  "head_dim": getattr(c, "head_dim", c.hidden_size // c.num_attention_heads),
                  "hidden": c.hidden_size, "vocab": c.vocab_size, "dtype": str(model.dtype),
                  "model_type": c.model_type, "chat_template": bool(getattr(tok, "chat_template", None))}))
"""


def _load_once(name: str, cache: str, threads: int) -> dict:
    env = {**os.environ, "KVPRESS_EXT_CACHE": cache}
    run = subprocess.run([sys.executable, "-c", CHILD, name, str(threads)], capture_output=True, text=True, env=env,
                         check=False)
    if run.returncode != 0:
        raise SystemExit(f"loading {name} failed: {run.stderr.strip().splitlines()[-1] if run.stderr else '?'}")
    return json.loads(run.stdout.strip().splitlines()[-1])


@command_entry("model_load")
def main() -> None:
    from kvpress_ext.runtime.models import available_models

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=None, help="short names (default: every registered one)")
    ap.add_argument("--repeat", type=int, default=3, help="cold and cached loads per model (median reported)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads in the loading process")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    models = available_models()
    rows = []
    for name in args.models or list(models):
        info = models[name]
        cold, cached, facts = [], [], {}
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory(prefix="kvpress-ext-cache-") as cache:
                first = _load_once(name, cache, args.threads)
                second = _load_once(name, cache, args.threads)
            cold.append(first["seconds"])
            cached.append(second["seconds"])
            facts = {k: v for k, v in second.items() if k not in ("seconds", "path")}
        row = {"name": name, "source": info.source, "licence": info.licence, **facts,
               "cold_s": statistics.median(cold), "cached_s": statistics.median(cached), "cold_all_s": cold,
               "cached_all_s": cached}
        rows.append(row)
        print(f"{name}: {row['parameters'] / 1e6:.2f}M parameters, context {row['context']}, {row['layers']} layers, "
              f"{row['heads']}/{row['kv_heads']} heads; load cold {row['cold_s']:.2f} s, cached "
              f"{row['cached_s']:.2f} s (medians of {args.repeat})", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_output(args.json, json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n", flag="--json")


if __name__ == "__main__":
    sys.exit(main())
