"""Needle in a haystack with A3 fusion: a needle sentence inserted at several depths into essay
haystacks of several lengths; retrieval accuracy (substring match) per depth x length, for full
prefill, fused chunk caches and fusion + eviction; writes a heat map PNG and a summary.md.

    PYTHONPATH=. python evaluation/needle.py --lengths 256 512 1024 --depths 0 0.25 0.5 0.75 1 --strategies blend
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvpress_ext.cli.common import OneLineArgumentParser
from kvpress_ext.evaluation import longcontext as lc

NEEDLE = "The special magic number is 7481."
QUESTION = "\n\nWhat is the special magic number mentioned in the text? The special magic number is"
ANSWER = "7481"


def main(argv=None) -> int:
    ap = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--haystack_dir", default=str(lc.shared_dir() / "data" / "paul_graham_essays"),
                    help="directory of .txt essays the haystack is cut from")
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024], help="context tokens")
    ap.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], help="in [0, 1]")
    ap.add_argument("--needle", default=NEEDLE, help="sentence inserted into the haystack")
    ap.add_argument("--question", default=QUESTION, help="text after the haystack that asks for the needle")
    ap.add_argument("--answer", default=ANSWER, help="substring a correct answer contains")
    lc.add_common_arguments(ap, "needle", default_chunk_tokens=128)
    args = ap.parse_args(argv)
    out_dir = Path(args.output_dir or "results/needle")
    args.output_dir = str(out_dir)

    def go():
        from kvpress_ext.evaluation.metrics import substring_match

        lc.check_common(args)
        if any(not 0 <= d <= 1 for d in args.depths):
            raise lc.InputError("--depths must lie in [0, 1]")
        if any(n < 16 for n in args.lengths):
            raise lc.InputError("--lengths must be at least 16 tokens")
        sentences = lc.load_haystack(args.haystack_dir)
        model, tok = lc.load_model(args.model)
        samples = []
        for n in args.lengths:
            for d in args.depths:
                context, where = lc.build_haystack(tok, sentences, n, d, args.needle)
                samples.append(lc.Sample(id=f"len{n}-depth{d}", context=context, question=args.question,
                                         answers=[args.answer], meta={"length": n, "depth": d, "needle_sentence": where}))
        runs = lc.run(lc.config_from_args(args, "needle", lengths=args.lengths, depths=args.depths), model, tok,
                      samples, lambda s, p: {"substring_match": substring_match(p, s.answers)},
                      progress=not args.no_progress)
        lc.plot_heatmaps(runs, args.depths, args.lengths, out_dir / "heatmap.png")
        with open(out_dir / "summary.md", "a") as f:
            f.write(lc.grid_markdown(runs, args.depths, args.lengths))
        print((out_dir / "summary.md").read_text())

    return lc.cli_main(go)


if __name__ == "__main__":
    sys.exit(main())
