"""The command line of ``evaluation/a3_quality.py`` over :mod:`kvpress_ext.evaluation.a3_quality`."""

from __future__ import annotations

import argparse
import json
import sys

from kvpress_ext.cli.common import (
    OneLineArgumentParser,
    add_model_argument,
    add_threads_argument,
    command_entry,
    quiet_command_line,
    set_threads,
)
from kvpress_ext.core.errors import KVPressExtError
from kvpress_ext.evaluation.a3_quality import evaluate, markdown_table, plot
from kvpress_ext.evaluation.model_cache import get_model
from kvpress_ext.evaluation.results import machine_load
from kvpress_ext.storage.safe_write import check_output_file, write_output

DESCRIPTION = """KL(full || fused) and top-1 agreement of A3 fusion strategies against a full prefill of the same chunks
(see kvpress_ext.evaluation.a3_quality), on --model (a short name, default smollm2-135m, a local directory or a
hub id).

    python evaluation/a3_quality.py --model stories260k --samples 12 --out results/a3_quality.json \\
        --plot docs/results/a3_quality.png

(--chunk-tokens / --question-tokens, the former spellings, still work.)
"""


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineArgumentParser(prog="a3_quality.py", description=DESCRIPTION,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(ap, chat_template=False)  # raw text: it scores next-token distributions of a document
    ap.add_argument("--samples", type=int, default=12, help="documents (each cut into --chunks chunks) evaluated")
    ap.add_argument("--chunks", type=int, default=4, help="chunks per document, each cached separately")
    ap.add_argument("--chunk_tokens", "--chunk-tokens", type=int, default=96, help="tokens per chunk")
    ap.add_argument("--question_tokens", "--question-tokens", type=int, default=48,
                    help="tokens after the chunks whose predictions are compared (KL, top-1)")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.05, 0.15, 0.3, 1.0],
                    help="fractions of document tokens recomputed")
    ap.add_argument("--out", default="results/a3_quality.json", help="JSON file for the rows")
    ap.add_argument("--plot", default=None, help="also write a plot to this PNG file")
    add_threads_argument(ap)
    return ap


@command_entry("a3_quality")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_output_file(args.out, flag="--out")
    if args.plot:
        check_output_file(args.plot, kind="image", flag="--plot")
    quiet_command_line("a3_quality")
    threads = set_threads(args.threads)
    load_start = machine_load()
    try:
        model, tok = get_model(args.model, device="cpu")
    except KVPressExtError as exc:
        print(f"a3_quality: error: {exc}", file=sys.stderr)
        sys.exit(2)
    rows = evaluate(model, tok, rates=args.rates, n_samples=args.samples, n_chunks=args.chunks,
                    chunk_tokens=args.chunk_tokens, question_tokens=args.question_tokens)
    write_output(args.out, json.dumps({"args": vars(args), "rows": rows, "threads": threads,
                                       "load_start": load_start, "load_end": machine_load()}, indent=1), flag="--out")
    print(markdown_table(rows, args.rates))
    if args.plot:
        plot(rows, args.rates, args.plot)
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return 0

