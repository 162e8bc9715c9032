"""Needle in a haystack for every press (and A3 fusion): a pass key (5-7 random digits from --seed), or RULER's
multi-key / multi-value needles, at several depths of haystacks of several lengths; accuracy per depth x length,
question-agnostic or --query_aware; the fraction of the needle each press kept, per layer.

    PYTHONPATH=. python evaluation/needle.py --model /work/smollm2-135m --lengths 1024 2048 --depths 0 0.5 1 \
        --num_keys 2 --press snapkv streaming_llm rkv --compression_ratio 0.25 0.5 --both_modes
    PYTHONPATH=. python evaluation/needle.py --strategies debug blend random --rate 0.15 --lengths 2048
    PYTHONPATH=. python evaluation/needle.py --task multidoc --chunk_tokens 500 --lengths 2000 4000 \
        --strategies debug blend --rate 0.15

--task multidoc: multi-document QA, --lengths // --chunk_tokens documents (the starts of distinct files of
--haystack_dir, each cut to --chunk_tokens tokens, "Document [i] (Title: ...)"), the pass key in document
depth x (N - 1), rounded half up; A3 caches one chunk per document.

Writes one JSON per cell (<output_dir>/cells/), summary.json, summary.md and heatmap_<mode>.png; a second run
skips finished cells.
"""

from __future__ import annotations

import argparse
import sys

from kvpress_ext.cli.common import OneLineArgumentParser, command_entry
from kvpress_ext.evaluation import longcontext as lc
from kvpress_ext.evaluation import longcontext_grid as lg
from kvpress_ext.storage.inputs import shared_dir


def add_needle_arguments(ap, default_task: str, tasks) -> None:
    ap.add_argument("--task", default=default_task, choices=tasks, help="needle kind (default: %(default)s)")
    ap.add_argument("--haystack_file", default=None, help="a text file (default: --haystack_dir)")
    ap.add_argument("--haystack_dir", default=str(shared_dir() / "data" / "paul_graham_essays"),
                    help="a folder of *.txt files")
    ap.add_argument("--lengths", type=int, nargs="+", default=None, help="haystack tokens (default 256 512 1024)")
    ap.add_argument("--depths", type=float, nargs="+", default=None, help="needle depths in [0, 1]")
    ap.add_argument("--num_keys", type=int, default=None, help="samples (keys) per length x depth (default 3)")
    ap.add_argument("--n_needles", type=int, default=4, help="needles of multikey / multivalue")
    ap.add_argument("--seed", type=int, default=0, help="seed of the keys and values")


def needle_grid(args, name: str) -> int:
    def go():
        multidoc = args.task == lg.MULTIDOC
        if args.chunk_tokens is None:  # multidoc: each document is one A3 chunk
            args.chunk_tokens = (128 if args.quick else 512) if multidoc else 128
        if args.quick:
            args.lengths = args.lengths or [2 * args.chunk_tokens if multidoc else 128]
            args.depths = args.depths or [0.0, 1.0]
            args.num_keys = args.num_keys or 1
        lengths = args.lengths or ([2 * args.chunk_tokens, 4 * args.chunk_tokens] if multidoc else [256, 512, 1024])
        depths = args.depths if args.depths is not None else [0.0, 0.25, 0.5, 0.75, 1.0]
        num_keys = args.num_keys or 3
        max_new = args.max_new_tokens or (4 if args.quick else 12 * (args.n_needles if args.task == "multivalue"
                                                                        else 1))
        methods, modes = lg.check_args(args)
        if any(not 0 <= d <= 1 for d in depths):
            raise lc.InputError("--depths must lie in [0, 1]")
        if any(n < 16 for n in lengths):
            raise lc.InputError("--lengths must be at least 16 tokens")
        if num_keys < 1 or args.n_needles < 1:
            raise lc.InputError("--num_keys and --n_needles must be positive")
        haystack = args.haystack_file or args.haystack_dir
        if multidoc:
            if args.haystack_file:
                raise lc.InputError("--task multidoc takes a folder of documents: pass --haystack_dir, not "
                                    "--haystack_file")
            lc.check_documents(haystack, lengths, args.chunk_tokens)  # too few files: one line, exit 2
        else:
            lg.haystack_sentences(haystack)  # missing or empty: one line, exit 2
        model, tok = lg.get_model(args.model, args.attn_implementation)
        samples = [{"source": "needle", "task": args.task, "haystack": haystack, "length": n, "depth": d,
                    "key_index": k, "seed": args.seed, "n_needles": args.n_needles}
                   for n in lengths for d in depths for k in range(num_keys)]
        lg.check_lengths(model, tok, samples, lg.settings_from_args(args, max_new), modes)
        _, outputs = lg.run_grid(args, name, samples, methods, modes, max_new)
        print(outputs["markdown"])

    return lc.cli_main(go)


@command_entry("needle")
def main(argv=None) -> int:
    ap = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_needle_arguments(ap, "passkey", (*lg.NEEDLE_TASKS, lg.MULTIDOC))
    lg.add_grid_arguments(ap, "needle")
    return needle_grid(ap.parse_args(argv), "needle")


if __name__ == "__main__":
    sys.exit(main())
