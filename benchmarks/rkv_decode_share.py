"""R-KV's decode rate and compression share against an earlier revision of its scoring, and lazy streaming.

Three configs decode interleaved in blocks from the same prompt (SmolLM2-135M, ``--batch`` sequences of
``--position`` tokens of the novel, one torch thread): ``rkv@BUDGET`` as it is now, the same press with the scoring
functions of ``kvpress_ext/presses/rkv.py`` at git revision ``--baseline`` (started from a copy of the current
press's prefilled cache: both keep the same tokens, checked by ``benchmarks/rkv_compression.py``), and
``lazy_streaming@BUDGET``. Prints tokens/s (with the slowest and fastest block), the ratio to lazy streaming, the
share of decode time spent compressing and peak KV; the rounds go through
:func:`kvpress_ext.evaluation.timing.compare` against lazy streaming, so each record also has the ratio's per-round
spread, threads, load before and after and the reliable flag with its reasons; ``--output`` writes the records as
JSON.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/rkv_decode_share.py --baseline d2c1290 --position 1024 --batch 8
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
from pathlib import Path

import torch

from kvpress_ext.evaluation.results import load_text
from kvpress_ext.evaluation.throughput import Run, build_config, time_runs
from kvpress_ext.presses.rkv import RKVPress
from kvpress_ext.runtime.models import load_model
from kvpress_ext.storage.inputs import shared_dir
from kvpress_ext.storage.safe_write import write_output

_SPEC = importlib.util.spec_from_file_location("rkv_compression", Path(__file__).with_name("rkv_compression.py"))
rkv_compression = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(rkv_compression)


def baseline_press(rev: str, budget: int, interval: int) -> RKVPress:
    """An R-KV press whose compression uses ``rkv_select`` of revision ``rev`` and plain gathers (no rotation)."""
    old = rkv_compression.baseline(rev)

    class BaselineRKV(RKVPress):
        def _compress(self, module, cache, layer, st):
            st.materialize()
            keys, values = layer.keys, layer.values
            keep = old.rkv_select(self._queries(module, st, keys), keys, self.budget, self.window_size,
                                  self.initial_non_compressible_length, kernel_size=self.kernel_size,
                                  mix_lambda=self.mix_lambda, retain_direction=self.retain_direction,
                                  retain_ratio=self.retain_ratio)
            index = keep.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
            st.original, st.position = st.original.gather(2, keep), st.position.gather(2, keep)
            layer.keys, layer.values = keys.gather(2, index), values.gather(2, index)

    return BaselineRKV(budget=budget, compression_interval=interval)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", required=True, help="git revision whose rkv_select is the 'before'")
    ap.add_argument("--position", type=int, default=1024, help="prompt tokens per sequence")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--interval", type=int, default=128, help="compression interval (decoded tokens)")
    ap.add_argument("--tokens", type=int, default=384, help="timed tokens per config")
    ap.add_argument("--block", type=int, default=None,
                    help="tokens per config and round before the next config decodes (default --interval)")
    ap.add_argument("--output", default=None, help="JSON file for the records")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, tokenizer = load_model("smollm2-135m", device="cpu", dtype="float32")
    text = (shared_dir() / "data" / "pride_and_prejudice.txt").read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids[i * args.position:(i + 1) * args.position] for i in range(args.batch)])
    now = Run(f"rkv@{args.budget}", build_config(f"rkv@{args.budget}", args.interval, args.position), args.batch,
              args.position)
    now.prefill(model, x)
    before = Run(f"rkv@{args.budget} ({args.baseline})", baseline_press(args.baseline, args.budget, args.interval),
                 args.batch, args.position)
    before.cache, before.token = copy.deepcopy(now.cache), now.token.clone()
    lazy = Run(f"lazy_streaming@{args.budget}", build_config(f"lazy_streaming@{args.budget}", args.interval,
                                                              args.position), args.batch, args.position)
    lazy.prefill(model, x)
    runs = [now, before, lazy]
    for run in runs:
        run.decode(model, 4, timed=False)  # warm-up
    c = time_runs(model, runs, args.tokens, args.block or args.interval, reference=lazy.config)
    records = [run.record() for run in runs]
    for run, record in zip(runs, records):
        timing = c.record(run.config) if run is not lazy else {"reference": True}
        record.update(x_lazy=record["tok_s"] / records[-1]["tok_s"], timing=timing, command=" ".join(sys.argv))
        spread = f" (spread {100 * timing['speedup_spread']:.0f} %)" if run is not lazy else ""
        print(f"{record['config']:>28} {record['tok_s']:7.2f} tok/s (blocks {record['tok_s_blocks_min']:.2f}-"
              f"{record['tok_s_blocks_max']:.2f})  x lazy {record['x_lazy']:.3f}{spread}  compression "
              f"{100 * record['compression_share']:.2f} %  peak KV {record['peak_kv_mib']:.1f} MiB")
    print(f"threads {c.threads}, {load_text(c.loads[0], c.loads[-1])}; {c.flag()}")
    if args.output:
        write_output(args.output, json.dumps({"records": records}, indent=1), flag="--output")
    return 0


if __name__ == "__main__":
    sys.exit(main())
