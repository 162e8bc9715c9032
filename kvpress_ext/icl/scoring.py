"""pass@k scoring of generated solutions, and the scores' CSV and table.

The compress-in-context workflow samples several solutions per question; this module turns those free-text
generations (answers extracted and matched by :mod:`kvpress_ext.icl.answers`) into numbers that can be compared
across compression settings. Pure Python (standard library only), so scoring runs without torch or a GPU.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kvpress_ext.icl.answers import answers_match, extract_answer, normalize_answer
from kvpress_ext.storage.safe_write import write_output

__all__ = [
    "answers_match",
    "default_ks",
    "extract_answer",
    "format_scores_table",
    "normalize_answer",
    "pass_at_k",
    "score_generations",
    "write_scores_csv",
]

# --------------------------------------------------------------------------------------------------------------------
# pass@k
# --------------------------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k: probability that at least one of k samples drawn from n (c correct) is correct.

    Why a product: ``1 - C(n-c, k) / C(n, k)`` overflows floats for large n if the binomials are formed directly;
    the equivalent ``1 - prod_{i=n-c+1}^{n} (1 - k / i)`` stays in [0, 1] throughout.
    """
    for name, val in (("n", n), ("c", c), ("k", k)):
        if isinstance(val, bool) or not isinstance(val, int):
            raise TypeError(f"{name} must be an int, got {type(val).__name__}")
        if val < 0:
            raise ValueError(f"{name} must be non-negative, got {val}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > n:
        raise ValueError(f"k={k} exceeds the number of samples n={n}")
    if c > n:
        raise ValueError(f"c={c} exceeds the number of samples n={n}")
    if n - c < k:
        return 1.0  # every k-subset must contain a correct sample
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def default_ks(n: int) -> list[int]:
    """The k values reported by default: 1, every power of two up to n, and n itself (a compact log-scale sweep)."""
    if n < 1:
        return []
    ks = {1, n}
    p = 2
    while p <= n:
        ks.add(p)
        p *= 2
    return sorted(ks)


def _validate_ks(ks: Iterable[int]) -> list[int]:
    """Check user-supplied k values (positive ints) and return them sorted without duplicates."""
    out = set()
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"every k must be a positive int, got {k!r}")
        out.add(k)
    return sorted(out)


def score_generations(records: Sequence[dict[str, Any]], ks: Iterable[int] | None = None) -> dict[str, Any]:
    """Score sampled generations against reference answers and aggregate pass@k.

    ``records`` items are ``{"question": str, "answer": truth, "generations": [str, ...]}``. Why the per-k question
    count: sample counts can differ between questions (e.g. a run cut short), and pass@k is only defined when
    ``k <= n``, so each k is averaged over the questions that have at least k samples and the result says how many.

    Returns a JSON-serialisable dict with ``n_questions``, ``ks``, ``total_samples``, ``total_correct``,
    ``per_question`` (index, question, answer, n, correct, predictions, per-k pass values) and ``pass_at_k``
    (``{k: {"mean": float | None, "n_questions": int}}``; mean is None when no question has k samples).
    """
    per_question: list[dict[str, Any]] = []
    for idx, rec in enumerate(records):
        truth = rec.get("answer")
        generations = list(rec.get("generations") or [])
        predictions = [extract_answer(g) if isinstance(g, str) else None for g in generations]
        correct = sum(1 for p in predictions if truth is not None and answers_match(p, str(truth)))
        per_question.append(
            {
                "index": idx,
                "question": rec.get("question"),
                "answer": truth,
                "n": len(generations),
                "correct": correct,
                "predictions": predictions,
            }
        )

    max_n = max((q["n"] for q in per_question), default=0)
    k_list = default_ks(max_n) if ks is None else _validate_ks(ks)

    summary: dict[int, dict[str, Any]] = {}
    for k in k_list:
        values = [pass_at_k(q["n"], q["correct"], k) for q in per_question if q["n"] >= k]
        summary[k] = {"mean": (sum(values) / len(values)) if values else None, "n_questions": len(values)}
    for q in per_question:
        q["pass_at_k"] = {k: pass_at_k(q["n"], q["correct"], k) for k in k_list if q["n"] >= k}

    return {
        "n_questions": len(per_question),
        "ks": k_list,
        "total_samples": sum(q["n"] for q in per_question),
        "total_correct": sum(q["correct"] for q in per_question),
        "per_question": per_question,
        "pass_at_k": summary,
    }


# --------------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------------

CSV_FIELDS = ("k", "pass_at_k", "n_questions", "total_questions")


def write_scores_csv(result: dict[str, Any], path: str | Path) -> Path:
    """Write the pass@k summary of ``score_generations`` as CSV (one row per k) and return the path.

    Why a flat per-k file: it is what gets plotted against compression ratio and diffed between runs. Values are
    written at full precision; a k with no eligible question gets an empty ``pass_at_k`` cell.
    """
    import io


    total = result.get("n_questions", 0)
    fh = io.StringIO(newline="")
    writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for k in result.get("ks", []):
        entry = result["pass_at_k"][k]
        mean = entry["mean"]
        writer.writerow(
            {
                "k": k,
                "pass_at_k": "" if mean is None else repr(float(mean)),
                "n_questions": entry["n_questions"],
                "total_questions": total,
            }
        )
    return write_output(path, fh.getvalue(), flag="--csv", is_ours=is_scores_csv, what=SCORES_CSV_WHAT)


SCORES_CSV_WHAT = f"a scores CSV (header {','.join(CSV_FIELDS)})"


def is_scores_csv(path: Path) -> bool:
    """An existing file that ``write_scores_csv`` wrote (its header), which it may therefore replace."""
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            return fh.readline().strip() == ",".join(CSV_FIELDS)
    except (OSError, UnicodeDecodeError):
        return False


def format_scores_table(result: dict[str, Any]) -> str:
    """Render the pass@k summary as a fixed-width text table for logs and terminals.

    Why: a quick human check of a run; a ``*`` marks k values averaged over fewer than all questions.
    """
    total = result.get("n_questions", 0)
    per_q = result.get("per_question", [])
    ns = [q["n"] for q in per_q]
    if ns and min(ns) != max(ns):
        samples = f"{min(ns)}-{max(ns)}"
    else:
        samples = str(ns[0]) if ns else "0"
    correct = f"{result.get('total_correct', 0)}/{result.get('total_samples', 0)}"
    lines = [
        f"questions: {total}   samples/question: {samples}   correct samples: {correct}",
        f"{'k':>6}  {'pass@k':>8}  {'questions':>9}",
        f"{'-' * 6}  {'-' * 8}  {'-' * 9}",
    ]
    partial = False
    for k in result.get("ks", []):
        entry = result["pass_at_k"][k]
        mean = entry["mean"]
        value = "n/a" if mean is None else f"{mean:.4f}"
        mark = ""
        if entry["n_questions"] < total:
            mark, partial = "*", True
        lines.append(f"{k:>6}  {value:>8}  {entry['n_questions']:>9}{mark}")
    if partial:
        lines.append("* averaged only over questions with at least k samples")
    return "\n".join(lines)
