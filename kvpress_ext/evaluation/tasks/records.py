"""Record tasks: RULER-style (context / question / outputs) and LongBench-style (context / input / answers) data
files, or LongBench from the hub, one record per cell, scored with RULER's string match or LongBench's metric."""

from __future__ import annotations

from kvpress_ext.evaluation import longcontext as lc
from kvpress_ext.evaluation.metrics import score_longbench, substring_match

_FILES: dict[str, list[dict]] = {}


def keep_records(kind: str, path, task: str | None, records: list[dict]) -> None:
    """Serve ``records`` for the cells of (``kind``, ``path``, ``task``) without reading them again (LongBench
    records the command already loaded from the hub)."""
    _FILES[f"{kind}:{path}:{task}"] = records


def file_sample(params: dict) -> lc.Sample:
    """Record ``index`` of a RULER-style (context/question/outputs) or LongBench-style (context/input/answers)
    JSON/JSONL file, or of THUDM/LongBench ``task`` from the hub when ``data_file`` is None."""
    path, kind = params.get("data_file"), params["format"]
    key = f"{kind}:{path}:{params.get('task')}"
    if key not in _FILES:
        if path:
            records = lc.read_records(path)
            lc.require_fields(records, ("context", "question", "outputs") if kind == "ruler"
                              else ("context", "input", "answers"), path)
        else:
            import datasets

            records = list(datasets.load_dataset("THUDM/LongBench", params["task"], split="test"))
        _FILES[key] = records
    r = _FILES[key][params["index"]]
    if kind == "ruler":
        outputs = r["outputs"] if isinstance(r["outputs"], list) else [r["outputs"]]
        return lc.Sample(id=str(r.get("index", params["index"])), context=r["context"], question=r["question"],
                         answers=[str(o) for o in outputs], meta={"answer_prefix": r.get("answer_prefix", "")})
    answers = r["answers"] if isinstance(r["answers"], list) else [r["answers"]]
    return lc.Sample(id=str(r.get("_id", params["index"])), context=r["context"], question=f"Question: {r['input']}",
                     answers=[str(a) for a in answers], all_classes=r.get("all_classes"),
                     meta={"answer_prefix": "Answer:"})


def score(params: dict, sample: lc.Sample, prediction: str) -> float:
    if params.get("format") == "longbench":
        return float(score_longbench(params["task"], prediction, sample.answers, sample.all_classes))
    # RULER's string_match_all: the fraction of expected answers found in the prediction
    return sum(substring_match(prediction, [a]) for a in sample.answers) / len(sample.answers)

