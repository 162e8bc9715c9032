"""Text-matching metrics for long-context benchmarks (LongBench, RULER).

Everything here is plain Python (stdlib + numpy) so that scoring can run on a
machine without torch or any NLP package installed. The metrics follow the
definitions used by LongBench and RULER closely enough that scores are
comparable, with one known deviation: Chinese text is tokenised one character
per token instead of with a word segmenter (jieba), so scores on Chinese tasks
are close to, but not identical with, the official ones.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable

import numpy as np

__all__ = [
    "LONGBENCH_METRICS",
    "classification_accuracy",
    "count_or_retrieval_score",
    "edit_similarity",
    "exact_match",
    "levenshtein",
    "normalize_text",
    "qa_f1",
    "rouge_l",
    "score_longbench",
    "substring_match",
    "tokenize",
]

# Han ideographs (base block, extension A, compatibility, extensions B-F) and Japanese kana.
# Hangul is deliberately not included: Korean separates words with spaces.
_CJK_RE = re.compile("([\u3040-\u309f\u30a0-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef])")
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_INT_RE = re.compile(r"\d+")
_ASCII_PUNCT = frozenset(string.punctuation)


def _is_punctuation(ch: str) -> bool:
    return ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P")


def _as_list(ground_truths: str | Iterable[str]) -> list[str]:
    if isinstance(ground_truths, str):
        return [ground_truths]
    return list(ground_truths)


def normalize_text(s: str) -> str:
    """Normalise an answer string the SQuAD way so that surface differences do not count.

    Lowercases, deletes punctuation (ASCII and Unicode, e.g. Chinese full-width marks),
    drops the English articles a/an/the and collapses whitespace. CJK characters are
    surrounded by spaces so that, after splitting, each one is its own token: Chinese and
    Japanese do not mark word boundaries, and one character per token is a segmenter-free
    approximation.
    """
    s = s.lower()
    s = "".join(ch for ch in s if not _is_punctuation(ch))
    s = _CJK_RE.sub(r" \1 ", s)
    s = _ARTICLES_RE.sub(" ", s)
    return " ".join(s.split())


def tokenize(s: str) -> list[str]:
    """Split a string into normalised tokens (see `normalize_text`); the unit that F1 and ROUGE-L count."""
    return normalize_text(s).split()


def _f1_tokens(pred: list[str], truth: list[str]) -> float:
    common = Counter(pred) & Counter(truth)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred)
    recall = overlap / len(truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, ground_truths: str | list[str]) -> float:
    """Token-level F1 between prediction and answer, maximised over the accepted answers.

    This is the standard extractive/abstractive QA metric (SQuAD, LongBench): it gives
    partial credit for answers that are verbose or only partly right, which exact match
    would score as 0. An empty prediction scores 0.
    """
    pred = tokenize(prediction)
    if not pred:
        return 0.0
    return max((_f1_tokens(pred, tokenize(gt)) for gt in _as_list(ground_truths)), default=0.0)


def _lcs_length(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, ground_truths: str | list[str]) -> float:
    """ROUGE-L F-measure (beta=1) on normalised tokens, maximised over references.

    Uses the longest common subsequence, so it rewards summaries that keep the
    reference's content in the same order without requiring contiguous n-grams; this
    is the LongBench metric for the summarisation tasks.
    """
    pred = tokenize(prediction)
    if not pred:
        return 0.0
    best = 0.0
    for gt in _as_list(ground_truths):
        ref = tokenize(gt)
        lcs = _lcs_length(pred, ref)
        if lcs == 0:
            continue
        precision = lcs / len(pred)
        recall = lcs / len(ref)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def classification_accuracy(prediction: str, ground_truth: str, all_classes: list[str]) -> float:
    """LongBench classification score: credit split evenly among the class names the prediction mentions.

    Finds every class name that occurs (case-sensitively, as a substring) in the
    prediction. If the true class is among them the score is 1/len(matched), else 0;
    this penalises hedged answers that list several classes. As in LongBench, a matched
    class name that is a proper substring of the true class (e.g. "location" inside
    "other location") is discarded when the true class itself matched, so that a correct
    answer is not penalised merely for containing a shorter class name.
    """
    matched = [c for c in all_classes if c and c in prediction]
    if ground_truth in matched:
        matched = [c for c in matched if c == ground_truth or c not in ground_truth]
        return 1.0 / len(matched)
    return 0.0


def count_or_retrieval_score(prediction: str, ground_truth: str) -> float:
    """LongBench passage_count / passage_retrieval score: share of the numbers in the prediction that are right.

    The truth is the first integer in the ground truth (``"4"`` for counting,
    ``"Paragraph 4"`` or ``"段落4"`` for retrieval). Every integer in the prediction is a
    guess; the score is the fraction of guesses equal to the truth, so listing many
    numbers does not game the metric. No numbers (or no number in the truth) scores 0.
    """
    truth = _INT_RE.findall(ground_truth)
    guesses = _INT_RE.findall(prediction)
    if not truth or not guesses:
        return 0.0
    target = int(truth[0])
    return sum(int(g) == target for g in guesses) / len(guesses)


def levenshtein(a: str, b: str) -> int:
    """Character edit distance (insertions, deletions, substitutions, each cost 1).

    O(len(a) * len(b)) dynamic programme keeping only two rows of the table.
    """
    if len(a) < len(b):
        a, b = b, a  # keep the rows as short as possible
    if not b:
        return len(a)
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, start=1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
        prev = cur
    return prev[-1]


def _first_code_line(prediction: str) -> str:
    for line in prediction.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("```", "#", "//")):
            continue
        return stripped
    return ""


def edit_similarity(prediction: str, ground_truth: str) -> float:
    """Similarity of the predicted next line of code to the true one: 1 - levenshtein / max length.

    Used for code completion (lcc, repobench-p), where the answer is a single line.
    Models often wrap code in a markdown fence or open with a comment, so the first
    non-empty line that does not start with ```, # or // is taken as the prediction.
    Both lines are stripped of surrounding whitespace, so indentation is not scored.
    Two empty lines are identical (1.0).
    """
    pred = _first_code_line(prediction)
    truth = ground_truth.strip()
    longest = max(len(pred), len(truth))
    if longest == 0:
        return 1.0
    return 1.0 - levenshtein(pred, truth) / longest


def exact_match(prediction: str, ground_truths: str | list[str]) -> float:
    """1.0 if the normalised prediction equals any normalised answer, else 0.0.

    Strict metric for short factual answers; normalisation (see `normalize_text`) keeps it
    from failing on case, punctuation or articles.
    """
    pred = normalize_text(prediction)
    return float(any(pred == normalize_text(gt) for gt in _as_list(ground_truths)))


def substring_match(prediction: str, ground_truths: str | list[str]) -> float:
    """RULER "string match all": fraction of the expected strings found in the prediction (case-insensitive).

    RULER tasks (needles, variable tracking, ...) ask for several values at once and
    accept them anywhere in free-form output, so each expected string found counts
    equally. No expected strings scores 0.
    """
    truths = _as_list(ground_truths)
    if not truths:
        return 0.0
    pred = prediction.lower()
    return float(np.mean([gt.lower() in pred for gt in truths]))


LONGBENCH_METRICS: dict[str, Callable[..., float]] = {
    # single- and multi-document QA, few-shot QA
    "narrativeqa": qa_f1,
    "qasper": qa_f1,
    "multifieldqa_en": qa_f1,
    "multifieldqa_zh": qa_f1,
    "hotpotqa": qa_f1,
    "2wikimqa": qa_f1,
    "musique": qa_f1,
    "triviaqa": qa_f1,
    # summarisation
    "gov_report": rouge_l,
    "qmsum": rouge_l,
    "multi_news": rouge_l,
    "samsum": rouge_l,
    "dureader": rouge_l,
    "vcsum": rouge_l,
    # classification
    "trec": classification_accuracy,
    "lsht": classification_accuracy,
    # synthetic
    "passage_count": count_or_retrieval_score,
    "passage_retrieval_en": count_or_retrieval_score,
    "passage_retrieval_zh": count_or_retrieval_score,
    # code completion
    "lcc": edit_similarity,
    "repobench-p": edit_similarity,
}


def score_longbench(
    task: str,
    prediction: str,
    answers: str | list[str],
    all_classes: list[str] | None = None,
) -> float:
    """Score one LongBench prediction with its task's metric, taking the best over the accepted answers.

    ``task`` is a LongBench subset name; a LongBench-E name (``"hotpotqa_e"``) is scored
    like its base task. ``all_classes`` is required for the classification tasks
    (trec, lsht) and ignored otherwise.
    """
    metric = LONGBENCH_METRICS.get(task)
    if metric is None and task.endswith("_e"):
        metric = LONGBENCH_METRICS.get(task[:-2])
    if metric is None:
        raise ValueError(f"Unknown LongBench task {task!r}; known tasks: {', '.join(sorted(LONGBENCH_METRICS))}")
    if metric is classification_accuracy:
        if all_classes is None:
            raise ValueError(f"LongBench task {task!r} is a classification task and needs all_classes")
        return max((metric(prediction, gt, all_classes) for gt in _as_list(answers)), default=0.0)
    return max((metric(prediction, gt) for gt in _as_list(answers)), default=0.0)
