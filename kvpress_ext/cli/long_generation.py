"""The command line of ``evaluation/long_generation.py`` over :mod:`kvpress_ext.evaluation.runners.long_generation`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvpress_ext.cli.common import (
    OneLineArgumentParser,
    add_model_argument,
    add_threads_argument,
    command_entry,
    positive_int,
    quiet_command_line,
)
from kvpress_ext.core.errors import KVPressExtError
from kvpress_ext.evaluation.long_generation import DEFAULT_GEN_PROMPT, METHODS
from kvpress_ext.evaluation.runners.long_generation import QUICK, LongGenerationConfig, run

DESCRIPTION = """R-KV, lazy streaming and kvpress's DecodingPress on long generation, each against the full cache:
teacher-forced NLL of a 2,048-token continuation with the press compressing while decoding (--part nll), and
greedy generation of 1,000 tokens (--part gen: token agreement with the full cache, cache length per step).

    python evaluation/long_generation.py --part nll --budgets 256 512 1024
    python evaluation/long_generation.py --model stories260k --quick --device cpu

Writes nll_summary.json, nll.png, gen_summary.json, gen_cache.png and one JSON per cell under --output_dir, and
prints where; the same command again reuses finished cells (marked with the date they were measured)."""


def output_dir_for(model: str) -> str:
    """The default folder of a model's results: one per model, so runs on two models do not overwrite each other."""
    return str(Path("results") / "long_generation" / Path(str(model)).name)


def build_parser():
    p = OneLineArgumentParser(prog="long_generation", description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(p)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "auto"],
                   help="model weights' dtype (default: %(default)s)")
    p.add_argument("--part", choices=["nll", "gen", "both"], default="both",
                   help="nll: teacher-forced NLL of a continuation; gen: greedy generation (default: %(default)s)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="full (no press), rkv, lazy_streaming, DecodingPress around snapkv / streaming_llm "
                        "(default: all)")
    p.add_argument("--budgets", nargs="+", type=int, default=[256, 512, 1024], help="tokens kept (default: %(default)s)")
    p.add_argument("--compression_interval", type=positive_int, default=128,
                   help="rkv and DecodingPress: decoding steps between compressions (default: %(default)s)")
    p.add_argument("--text_file", default=None, help="text for part nll (default: ../shared/data/pride_and_prejudice.txt)")
    p.add_argument("--context", type=positive_int, default=512, help="prefilled tokens before the scored continuation")
    p.add_argument("--continuation", type=positive_int, default=2048, help="tokens scored (part nll)")
    p.add_argument("--decode_chunk_size", type=positive_int, default=1, help="continuation tokens per forward")
    p.add_argument("--segment", type=positive_int, default=256, help="tokens per point of the NLL plot")
    p.add_argument("--gen_tokens", type=positive_int, default=1000, help="tokens generated (part gen)")
    p.add_argument("--prompt", default=DEFAULT_GEN_PROMPT, help="user message of the generation prompt")
    p.add_argument("--target_budget", type=positive_int, default=512, help="budget of the R-KV target check (rkv within 2 %% of full's NLL; default: %(default)s)")
    p.add_argument("--output_dir", default=None, help="default: results/long_generation/<model>")
    p.add_argument("--quick", action="store_true",
                   help=f"a tiny setting, under a minute on the default model (options given explicitly win): "
                        f"{', '.join(f'{k}={v}' for k, v in QUICK.items())}")
    p.add_argument("--max_seconds", type=float, default=None,
                   help="start no new cell after this many seconds (finished cells are kept; rerun to continue)")
    p.add_argument("--no_progress", action="store_true", help="no per-cell lines")
    add_threads_argument(p)
    return p


@command_entry("long_generation")
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:  # the tiny setting, except what the command line sets
        for key, value in QUICK.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    quiet_command_line("long_generation")
    values = {k: v for k, v in vars(args).items() if k not in ("quick", "no_progress")}
    values["output_dir"] = args.output_dir or output_dir_for(args.model)
    try:
        return run(LongGenerationConfig(**values, progress=not args.no_progress, command=" ".join(sys.argv)))
    except KVPressExtError as exc:
        print(f"long_generation: error: {exc}", file=sys.stderr)
        return 2
