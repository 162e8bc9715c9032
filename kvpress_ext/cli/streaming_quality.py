"""The command line of ``evaluation/streaming_quality.py`` over :mod:`kvpress_ext.evaluation.runners.streaming` and
:mod:`kvpress_ext.evaluation.reports.streaming`."""

from __future__ import annotations

import argparse
import sys

import torch

from kvpress_ext.cli.common import (
    OneLineArgumentParser,
    add_threads_argument,
    command_entry,
    quiet_command_line,
    set_threads,
)
from kvpress_ext.core.errors import KVPressExtError
from kvpress_ext.evaluation.reports.streaming import report
from kvpress_ext.evaluation.runners.streaming import run

DESCRIPTION = """Per-segment perplexity of StreamingLLM caches over a long text stream (--model: a short name, default
smollm2-135m, a directory or a hub id; --text_file: a file or a folder of .txt files, default Pride and Prejudice
followed by the Paul Graham essays of the shared folder; the recorded stories260k results use
--text_file ../shared/data/tinystories_val.txt).

Methods: dense (growing cache), reference (sliding window of sinks + recent tokens recomputed from scratch for
every target), eager (lazy_streaming with slack=0) and lazy (slack > 0), all at the same --cap_total. Each method is
a separate run that saves its per-token NLLs under --out_dir; --report merges them into a JSON and a plot.

    python evaluation/streaming_quality.py --model stories260k --method lazy --tokens 20000
    python evaluation/streaming_quality.py --model stories260k --report
"""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="streaming_quality.py", description=DESCRIPTION,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="short name (smollm2-135m, stories260k), local directory or hub id (default: %(default)s)")
    p.add_argument("--method", choices=["dense", "reference", "eager", "lazy"], help="the one method this run computes")
    p.add_argument("--report", action="store_true", help="merge saved runs into JSON + plot")
    p.add_argument("--tokens", type=int, default=20000, help="length of the token stream")
    p.add_argument("--text_file", default=None,
                   help="text file, or a folder whose .txt files are joined by name (default: Pride and Prejudice "
                        "followed by the Paul Graham essays in ../shared/data)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "auto"],
                   help="model weights dtype (auto: as saved)")
    # The dashed spellings are the former names, kept so old commands still run.
    p.add_argument("--cap_total", "--cap-total", type=int, default=512, help="most tokens in the cache (all methods)")
    p.add_argument("--n_sink", "--n-sink", type=int, default=4, help="attention sinks kept")
    p.add_argument("--slack", type=int, default=64, help="lazy: tokens allowed past the cap before a compaction")
    p.add_argument("--batch", type=int, default=16, help="reference windows per forward")
    p.add_argument("--stride", "--reference_stride", type=int, default=1,
                   help="reference: score every stride-th target (a forward of cap_total tokens per scored target)")
    p.add_argument("--max_seconds", type=float, default=None,
                   help="reference / eager / lazy: stop after this long and save the predictions made so far")
    p.add_argument("--segment", type=int, default=512, help="tokens per point of the perplexity curve")
    p.add_argument("--out_dir", "--out-dir", default="results/streaming_quality",
                   help="where each method's per-token NLLs are saved")
    p.add_argument("--json", default="results/streaming_quality.json", help="report JSON file")
    p.add_argument("--plot", default="docs/results/streaming_quality.png", help="report plot file")
    add_threads_argument(p)
    return p


@command_entry("streaming_quality")
def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    quiet_command_line("streaming_quality")
    set_threads(args.threads)
    torch.set_grad_enabled(False)
    if not (args.report or args.method):
        p.error("give --method or --report")
    try:
        report(args) if args.report else run(args)
    except KVPressExtError as exc:
        print(f"streaming_quality: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
