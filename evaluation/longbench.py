"""LongBench for every press (and A3 fusion), scored with each task's LongBench metric; question-agnostic or
--query_aware. Data: THUDM/LongBench from the hub, or --data_file JSON/JSONL with context/input/answers
(optional all_classes).

    PYTHONPATH=. python evaluation/longbench.py --task hotpotqa --model <hub id or path> --press snapkv knorm \
        --compression_ratio 0.25 0.5 --strategies blend debug --max_samples 50
    PYTHONPATH=. python evaluation/longbench.py --task hotpotqa --data_file my.jsonl
"""

from __future__ import annotations

import argparse
import sys

from kvpress_ext.cli.common import OneLineArgumentParser, command_entry
from kvpress_ext.evaluation import longcontext as lc
from kvpress_ext.evaluation import longcontext_grid as lg


@command_entry("longbench")
def main(argv=None) -> int:
    ap = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="hotpotqa", help="LongBench subset, e.g. hotpotqa, qasper, trec")
    ap.add_argument("--data_file", default=None, help="local JSON/JSONL with context/input/answers[/all_classes]")
    ap.add_argument("--max_samples", type=int, default=None, help="evaluate only the first N records")
    lg.add_grid_arguments(ap, "longbench")
    args = ap.parse_args(argv)

    def go():
        from kvpress_ext.evaluation.metrics import LONGBENCH_METRICS

        if args.task not in LONGBENCH_METRICS and args.task.removesuffix("_e") not in LONGBENCH_METRICS:
            raise lc.InputError(f"unknown LongBench task {args.task!r}; choose one of: "
                                f"{', '.join(sorted(LONGBENCH_METRICS))}")
        methods, modes = lg.check_args(args)
        params = {"source": "file", "format": "longbench", "data_file": args.data_file, "task": args.task}
        if args.data_file:
            records = lc.read_records(args.data_file)
            lc.require_fields(records, ("context", "input", "answers"), args.data_file)
        else:
            try:
                import datasets

                records = list(datasets.load_dataset("THUDM/LongBench", args.task, split="test"))
            except Exception as e:  # noqa: BLE001 - offline, unknown config, script datasets unsupported...
                raise lc.InputError(f"cannot load THUDM/LongBench {args.task!r} ({type(e).__name__}); "
                                    "pass --data_file") from None
            lg._FILES[f"longbench:None:{args.task}"] = records
        n = min(len(records), args.max_samples or len(records), 2 if args.quick else len(records))
        max_new = args.max_new_tokens or (4 if args.quick else 32)
        model, _ = lg.get_model(args.model, args.attn_implementation)
        if args.max_context_tokens is None and lg.context_limit(model):
            args.max_context_tokens = lg.context_limit(model) - max_new - 128
        samples = [{**params, "index": i} for i in range(n)]
        _, outputs = lg.run_grid(args, "longbench", samples, methods, modes, max_new)
        print(outputs["markdown"])

    return lc.cli_main(go)


if __name__ == "__main__":
    sys.exit(main())
