"""RULER-style retrieval with A3 fusion: full prefill vs fused chunk caches (vs fusion + eviction).

Data: ``--data_file`` JSONL with context/question/outputs (optional answer_prefix), or the built-in
niah_single generator (a "special magic number" for a random key hidden in the essay haystack at
random depth). Score: RULER's string match (fraction of outputs found in the prediction); exact match too.

    PYTHONPATH=. python evaluation/ruler.py --lengths 256 512 --max_samples 8 --strategies blend debug
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from kvpress_ext.cli.common import OneLineArgumentParser
from kvpress_ext.evaluation import longcontext as lc

KEYS = ["sunset", "harbor", "violin", "glacier", "lantern", "meadow", "falcon", "comet", "orchid", "quartz"]


def niah_single(tokenizer, sentences, lengths, n_per_length, seed=0) -> list[lc.Sample]:
    rng = random.Random(seed)
    samples = []
    for length in lengths:
        for j in range(n_per_length):
            key, value = rng.choice(KEYS), str(rng.randint(1000000, 9999999))
            depth = rng.random()
            needle = f"One of the special magic numbers for {key} is: {value}."
            context, _ = lc.build_haystack(tokenizer, sentences, length, depth, needle)
            samples.append(lc.Sample(
                id=f"niah_single-{length}-{j}", context=context,
                question=(f"\n\nWhat is the special magic number for {key} mentioned in the provided text?"
                          f" The special magic number for {key} mentioned in the provided text is"),
                answers=[value], meta={"length": length, "depth": round(depth, 3)}))
    return samples


def main(argv=None) -> int:
    ap = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_file", default=None, help="JSONL with context/question/outputs[/answer_prefix]")
    ap.add_argument("--task", default="niah_single", choices=["niah_single"], help="built-in generator")
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512], help="built-in: context tokens")
    ap.add_argument("--samples_per_length", type=int, default=4, help="built-in: samples per context length")
    ap.add_argument("--haystack_dir", default=str(lc.shared_dir() / "data" / "paul_graham_essays"),
                    help="built-in: directory of .txt essays the haystack is cut from")
    ap.add_argument("--seed", type=int, default=0, help="built-in: seed of the generated samples")
    lc.add_common_arguments(ap, "ruler")
    args = ap.parse_args(argv)
    args.output_dir = args.output_dir or "results/ruler"

    def go():
        from kvpress_ext.evaluation.metrics import exact_match, substring_match

        lc.check_common(args)
        if args.data_file:
            records = lc.read_records(args.data_file)
            lc.require_fields(records, ("context", "question", "outputs"), args.data_file)
            samples = [lc.Sample(id=str(r.get("index", i)), context=r["context"],
                                 question=r["question"] + r.get("answer_prefix", ""),
                                 answers=[str(o) for o in (r["outputs"] if isinstance(r["outputs"], list)
                                                           else [r["outputs"]])],
                                 meta={k: r[k] for k in ("length", "depth") if k in r})
                       for i, r in enumerate(records)]
            model, tok = lc.load_model(args.model)
        else:
            if any(n < 16 for n in args.lengths):
                raise lc.InputError("--lengths must be at least 16 tokens")
            sentences = lc.load_haystack(args.haystack_dir)
            model, tok = lc.load_model(args.model)
            samples = niah_single(tok, sentences, args.lengths, args.samples_per_length, args.seed)

        def score(sample, prediction):
            # RULER string_match_all: fraction of the expected outputs present in the prediction
            found = sum(substring_match(prediction, [a]) for a in sample.answers) / len(sample.answers)
            return {"string_match": found, "exact_match": exact_match(prediction.strip(), sample.answers)}

        lc.run(lc.config_from_args(args, "ruler", task=args.task if not args.data_file else args.data_file),
               model, tok, samples, score, progress=not args.no_progress)
        print(Path(args.output_dir, "summary.md").read_text())

    return lc.cli_main(go)


if __name__ == "__main__":
    sys.exit(main())
