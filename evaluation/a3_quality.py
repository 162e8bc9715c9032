"""KL(full || fused) and top-1 agreement of A3 fusion strategies on stories260k (see kvpress_ext.evaluation.a3_quality).

    PYTHONPATH=. python evaluation/a3_quality.py --samples 12 --out results/a3_quality.json --plot docs/results/a3_quality.png
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvpress_ext.evaluation.a3_quality import evaluate, markdown_table, plot, shared_dir
from kvpress_ext.safe_io import check_output_file, write_output


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(shared_dir() / "models" / "stories260k"))
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--chunk-tokens", type=int, default=96)
    ap.add_argument("--question-tokens", type=int, default=48)
    ap.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.05, 0.15, 0.3, 1.0])
    ap.add_argument("--out", default="results/a3_quality.json")
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    check_output_file(args.out, flag="--out")
    if args.plot:
        check_output_file(args.plot, kind="image", flag="--plot")
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    rows = evaluate(model, tok, rates=args.rates, n_samples=args.samples, n_chunks=args.chunks,
                    chunk_tokens=args.chunk_tokens, question_tokens=args.question_tokens)
    write_output(args.out, json.dumps({"args": vars(args), "rows": rows}, indent=1), flag="--out")
    print(markdown_table(rows, args.rates))
    if args.plot:
        plot(rows, args.rates, args.plot)


if __name__ == "__main__":
    main()
