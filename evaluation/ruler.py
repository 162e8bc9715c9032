"""RULER-style retrieval for every press (and A3 fusion): built-in niah_single / multikey / multivalue needles
in a haystack (see evaluation/needle.py for the options), or --data_file JSONL with context/question/outputs
(optional answer_prefix). Score: RULER's string match (fraction of the expected outputs in the answer).

    PYTHONPATH=. python evaluation/ruler.py --task multikey --lengths 1024 --press snapkv --compression_ratio 0.5
    PYTHONPATH=. python evaluation/ruler.py --data_file ruler.jsonl --press knorm --query_aware
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from kvpress_ext.cli.common import OneLineArgumentParser, command_entry
from kvpress_ext.evaluation import longcontext as lc
from kvpress_ext.evaluation import longcontext_grid as lg


def _needle_module():
    spec = importlib.util.spec_from_file_location("eval_needle", Path(__file__).with_name("needle.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@command_entry("ruler")
def main(argv=None) -> int:
    needle = _needle_module()
    ap = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_file", default=None, help="JSONL with context/question/outputs[/answer_prefix]")
    ap.add_argument("--max_samples", type=int, default=None, help="with --data_file: the first N records")
    needle.add_needle_arguments(ap, "niah_single", [t for t in lg.NEEDLE_TASKS if t != "passkey"])
    lg.add_grid_arguments(ap, "ruler")
    args = ap.parse_args(argv)
    if not args.data_file:
        return needle.needle_grid(args, "ruler")

    def go():
        methods, modes = lg.check_args(args)
        records = lc.read_records(args.data_file)
        lc.require_fields(records, ("context", "question", "outputs"), args.data_file)
        n = min(len(records), args.max_samples or len(records), 2 if args.quick else len(records))
        max_new = args.max_new_tokens or (4 if args.quick else 16)
        lg.get_model(args.model, args.attn_implementation)
        samples = [{"source": "file", "format": "ruler", "data_file": str(args.data_file), "index": i,
                    "length": records[i].get("length"), "depth": records[i].get("depth")} for i in range(n)]
        _, outputs = lg.run_grid(args, "ruler", samples, methods, modes, max_new)
        print(outputs["markdown"])

    return lc.cli_main(go)


if __name__ == "__main__":
    sys.exit(main())
