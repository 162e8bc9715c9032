"""KL(full || fused) and top-1 agreement of A3 fusion strategies (see kvpress_ext.evaluation.a3_quality).

    PYTHONPATH=. python evaluation/a3_quality.py --model stories260k --samples 12 --out results/a3_quality.json \
        --plot docs/results/a3_quality.png

``--model`` takes a short name (default smollm2-135m), a local directory or a hub id.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from kvpress_ext.cli.common import add_model_argument
from kvpress_ext.errors import KVPressExtError
from kvpress_ext.evaluation.a3_quality import evaluate, markdown_table, plot
from kvpress_ext.models import load_model


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    add_model_argument(ap, chat_template=False)  # raw text: it scores next-token distributions of a document
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--chunk-tokens", type=int, default=96)
    ap.add_argument("--question-tokens", type=int, default=48)
    ap.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.05, 0.15, 0.3, 1.0])
    ap.add_argument("--out", default="results/a3_quality.json")
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    try:
        model, tok = load_model(args.model, device="cpu")
    except KVPressExtError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    rows = evaluate(model, tok, rates=args.rates, n_samples=args.samples, n_chunks=args.chunks,
                    chunk_tokens=args.chunk_tokens, question_tokens=args.question_tokens)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(markdown_table(rows, args.rates))
    if args.plot:
        plot(rows, args.rates, args.plot)


if __name__ == "__main__":
    main()
