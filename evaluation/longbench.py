"""LongBench with A3 fusion: full prefill vs fused chunk caches (vs fusion + eviction), scored with each
task's LongBench metric (see kvpress_ext.evaluation.longcontext).

    PYTHONPATH=. python evaluation/longbench.py --task hotpotqa --model <hub id or path> --strategies blend debug \
        --rate 0.15 --evict snapkv --max_samples 50
    PYTHONPATH=. python evaluation/longbench.py --task hotpotqa --data_file my.jsonl   # fields context/input/answers
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvpress_ext.cli.common import OneLineArgumentParser
from kvpress_ext.evaluation import longcontext as lc


def load_samples(args) -> list[lc.Sample]:
    if args.data_file:
        records = lc.read_records(args.data_file)
        lc.require_fields(records, ("context", "input", "answers"), args.data_file)
    else:
        try:
            import datasets

            records = list(datasets.load_dataset("THUDM/LongBench", args.task, split="test"))
        except Exception as e:  # noqa: BLE001 - offline, unknown config, script datasets unsupported...
            raise lc.InputError(f"cannot load THUDM/LongBench {args.task!r} ({type(e).__name__}); pass --data_file")
    samples = []
    for i, r in enumerate(records):
        answers = r["answers"] if isinstance(r["answers"], list) else [r["answers"]]
        samples.append(lc.Sample(id=str(r.get("_id", i)), context=r["context"], question=r["input"],
                                 answers=[str(a) for a in answers], all_classes=r.get("all_classes")))
    return samples


def main(argv=None) -> int:
    ap = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="hotpotqa", help="LongBench subset, e.g. hotpotqa, qasper, trec")
    ap.add_argument("--data_file", default=None, help="local JSON/JSONL with context/input/answers[/all_classes]")
    lc.add_common_arguments(ap, "longbench")
    args = ap.parse_args(argv)
    args.output_dir = args.output_dir or "results/longbench"

    def go():
        from kvpress_ext.evaluation.metrics import LONGBENCH_METRICS, score_longbench

        if args.task not in LONGBENCH_METRICS and args.task.removesuffix("_e") not in LONGBENCH_METRICS:
            raise lc.InputError(f"unknown LongBench task {args.task!r}; choose one of: "
                             f"{', '.join(sorted(LONGBENCH_METRICS))}")
        lc.check_common(args)
        samples = load_samples(args)
        model, tok = lc.load_model(args.model)

        def score(sample, prediction):
            return {args.task: score_longbench(args.task, prediction, sample.answers, sample.all_classes)}

        runs = lc.run(lc.config_from_args(args, "longbench", task=args.task), model, tok, samples, score,
                      question_text=lambda s: f"\n\nQuestion: {s.question}\nAnswer:", progress=not args.no_progress)
        print(Path(args.output_dir, "summary.md").read_text())
        return runs

    return lc.cli_main(go)


if __name__ == "__main__":
    sys.exit(main())
