"""``python evaluation/perplexity.py``: perplexity, speed and memory with and without KV-cache compression.

The options are the fields of :class:`~kvpress_ext.evaluation.runners.perplexity.PerplexityConfig` (defaults read from
it); the work is :func:`~kvpress_ext.evaluation.runners.perplexity.run`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from kvpress_ext.cli.common import (
    MODEL_HELP,
    DefaultsHelpFormatter,
    OneLineArgumentParser,
    add_placement_args,
    add_sweep_args,
    add_threads_argument,
    command_entry,
    parse_press_kwargs,
    placement_kwargs,
    positive_int,
    quiet_command_line,
    seed_int,
)
from kvpress_ext.core.errors import KVPressExtError
from kvpress_ext.evaluation import perplexity as ppl
from kvpress_ext.evaluation import results
from kvpress_ext.evaluation.runners.perplexity import PerplexityConfig, run
from kvpress_ext.runtime.models import DTYPES

_DEFAULTS = PerplexityConfig(command="")


def build_parser() -> argparse.ArgumentParser:
    d = _DEFAULTS
    p = OneLineArgumentParser(
        description="Perplexity, speed and memory of a model with and without KV-cache compression. With no "
                    f"options: {d.model} on the first {d.max_eval_tokens} tokens of a local text (the shared "
                    f"WikiText-2 test file, else Pride and Prejudice) in {d.context_limit}-token windows, speed from "
                    f"{d.num_runs} timed run(s) after a warm-up of a "
                    f"{d.context_limit}-token prefill + {d.max_new_tokens} decoded tokens; offline, about 2 minutes "
                    "of CPU time (plus the model's one-time conversion). Hub data sets only when asked for.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--model", default=d.model, help=MODEL_HELP)
    p.add_argument("--dataset", default=d.dataset, choices=ppl.DATASETS,
                   help="text source: a local file (text) or a hub data set (wikitext, pg19: downloaded)")
    p.add_argument("--subset", default=d.subset, help="dataset configuration (wikitext)")
    p.add_argument("--split", default=d.split, help="dataset split")
    p.add_argument("--sample_idx", type=int, default=d.sample_idx, help="PG-19 book index")
    p.add_argument("--text_file", default=d.text_file,
                   help="UTF-8 text for --dataset text (default: ../shared/data/wikitext2_test.raw, else "
                        "../shared/data/pride_and_prejudice.txt; the folder is $KVPRESS_EXT_SHARED when set)")
    p.add_argument("--context_limit", type=int, default=d.context_limit,
                   help="window length; each window starts a fresh cache")
    p.add_argument("--max_eval_tokens", type=positive_int, default=d.max_eval_tokens, help="evaluate only the first N tokens")
    p.add_argument("--press", nargs="+", default=[d.press],
                   help="registered press names (one runs next to the uncompressed baseline), 'all', or 'no_press'; "
                        "several (or all) make a sweep")
    p.add_argument("--no_baseline", action="store_true", help="do not run no_press next to the presses")
    p.add_argument("--compression_ratio", nargs="+", type=float, default=[d.compression_ratio],
                   help="fractions of the cache to remove, for presses with a compression_ratio parameter; "
                        "several make a sweep (cross product with --press)")
    p.add_argument("--press_kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra press parameters (int/float/bool/none/str values)")
    p.add_argument("--ppl_apply_press", action="store_true", default=d.ppl_apply_press,
                   help="score every token from the compressed cache (text fed chunk by chunk under the press); "
                        "the default: a press that compresses only one whole prefill gets the full-context "
                        "perplexity, and the table says so")
    p.add_argument("--no_ppl_press", dest="ppl_apply_press", action="store_false",
                   help="perplexity without the press, the press only in the speed and memory run (the former "
                        "default 'speed and memory only' behaviour)")
    p.add_argument("--chunk_size", type=int, default=d.chunk_size,
                   help="tokens per forward with --ppl_apply_press (window presses such as snapkv need more than their window)")
    p.add_argument("--decode_chunk_size", type=int, default=d.decode_chunk_size,
                   help="tokens per forward after the first chunk, for presses that compress while decoding")
    p.add_argument("--segment", type=int, default=d.segment, help="tokens per point of the NLL curve")
    p.add_argument("--speed_only", action="store_true", help="skip perplexity; measure speed and memory")
    p.add_argument("--speed_decode_only", action="store_true", help="skip perplexity; measure decode throughput only")
    p.add_argument("--no_speed", action="store_true", help="skip the speed measurement")
    p.add_argument("--speed_context", type=positive_int, default=d.speed_context,
                   help="prefill length for speed (default: min(context_limit, tokens))")
    p.add_argument("--max_new_tokens", type=int, default=d.max_new_tokens, help="tokens decoded by the speed run")
    p.add_argument("--min_new_tokens", type=int, default=d.min_new_tokens, help="decode at least this many tokens")
    p.add_argument("--num_runs", type=int, default=d.num_runs, help="timed runs (median reported) after one warm-up")
    p.add_argument("--attn_implementation", default=d.attn_implementation,
                   choices=("eager", "sdpa", "flash_attention_2"), help="attention kernel of the model")
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    add_placement_args(p)
    p.add_argument("--dtype", default=d.dtype, choices=list(DTYPES), help="model weights' dtype")
    p.add_argument("--seed", type=seed_int, default=d.seed, help="torch seed")
    add_threads_argument(p, "--num_threads")
    p.add_argument("--output_dir", default=d.output_dir,
                   help="where the JSON per run and the summary go (default: results/perplexity/<model name>)")
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")
    p.add_argument("--summarize", metavar="DIR", default=None,
                   help="only rebuild summary.md/summary.png from the cell files in DIR (also while a sweep runs)")
    add_sweep_args(p)
    return p


def config_from_args(args: argparse.Namespace) -> PerplexityConfig:
    """The parsed options as a :class:`PerplexityConfig` (``--press_kwargs`` parsed into a dict)."""
    names = {f.name for f in dataclasses.fields(PerplexityConfig)} - {"command"}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["press_kwargs"] = parse_press_kwargs(args.press_kwargs)
    values.update(placement_kwargs(args))
    return PerplexityConfig(**values)


@command_entry("perplexity")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_command_line("perplexity")
    try:
        if args.summarize:
            md, png = results.summarize_directory(args.summarize)
            print(Path(md).read_text())
            print(f"wrote {md}" + (f" and {png}" if png else ""))
            return 0
        run(config_from_args(args))
    except KVPressExtError as exc:  # an OSError (read-only, removed folder...) goes to command_entry's one line
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
