"""Tests for kvpress_ext.evaluation.metrics; expected values are worked out by hand in the comments."""

from __future__ import annotations

import random
from functools import cache

import pytest

from kvpress_ext.evaluation.metrics import (
    LONGBENCH_METRICS,
    classification_accuracy,
    count_or_retrieval_score,
    edit_similarity,
    exact_match,
    levenshtein,
    normalize_text,
    qa_f1,
    rouge_l,
    score_longbench,
    substring_match,
    tokenize,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The  Quick, brown fox!", "quick brown fox"),  # article, punctuation, double space
        ("An apple a day", "apple day"),  # all three articles go
        ("Theatre thereafter", "theatre thereafter"),  # articles only as whole words
        ("don't U.S.", "dont us"),  # punctuation is deleted, not replaced by a space
        ("  \n\t ", ""),
        ("", ""),
        ("我爱北京。", "我 爱 北 京"),  # one token per Han character, full-width stop removed
        ("Hello世界 test", "hello 世 界 test"),  # mixed scripts
        ("すし、ください", "す し く だ さ い"),  # kana also one per token
        ("안녕 하세요", "안녕 하세요"),  # Hangul is space-delimited, left whole
    ],
)
def test_normalize_text(text, expected):
    assert normalize_text(text) == expected


def test_tokenize_cjk():
    assert tokenize("北京大学") == ["北", "京", "大", "学"]


@pytest.mark.parametrize(
    ("prediction", "ground_truths", "expected"),
    [
        # [cat, sat, on, mat] vs [cat, sat]: overlap 2, P = 2/4, R = 2/2, F1 = 2*0.5*1/1.5 = 2/3
        ("the cat sat on mat", "cat sat", 2 / 3),
        # articles, case and punctuation vanish: [eiffel, tower] vs [eiffel, tower] -> 1
        ("The Eiffel Tower!", "eiffel tower", 1.0),
        # [paris, france] vs [paris]: P = 1/2, R = 1, F1 = 2/3
        ("Paris, France.", "Paris", 2 / 3),
        # bag counts: [x, x, y] & [x, y, y] = {x: 1, y: 1} -> overlap 2, P = R = 2/3, F1 = 2/3
        ("x x y", "x y y", 2 / 3),
        # max over answers: vs [john] P = 1/3, R = 1, F1 = 0.5; vs [smith, jr] P = 2/3, R = 1, F1 = 0.8
        ("john smith jr", ["john", "smith jr"], 0.8),
        ("barack obama", ["president", "barack obama"], 1.0),
        ("completely different", "cat", 0.0),  # no overlap
        ("", "cat", 0.0),  # empty prediction
        ("the . ,", "cat", 0.0),  # prediction empty after normalisation
        ("", "", 0.0),  # empty prediction scores 0 even against an empty answer
        ("cat", [], 0.0),  # no answers
        # CJK: [北, 京, 大, 学] vs [北, 京]: P = 2/4, R = 1, F1 = 2/3
        ("北京大学", "北京", 2 / 3),
    ],
)
def test_qa_f1(prediction, ground_truths, expected):
    assert qa_f1(prediction, ground_truths) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prediction", "ground_truths", "expected"),
    [
        ("the cat sat", "The cat sat.", 1.0),
        # [police, killed, gunman] vs [police, kill, gunman]: LCS = police..gunman = 2 (not contiguous)
        # P = R = 2/3, F = 2/3
        ("police killed the gunman", "police kill the gunman", 2 / 3),
        # [w, x, y, z] vs [w, y, q, z, q, q]: LCS = w, y, z = 3; P = 3/4, R = 3/6
        # F = 2 * 0.75 * 0.5 / 1.25 = 0.6
        ("w x y z", "w y q z q q", 0.6),
        # order matters (unlike F1): [y, x] vs [x, y]: LCS = 1, P = R = 1/2, F = 0.5
        ("y x", "x y", 0.5),
        # max over references: 0.5 (as above) vs 1.0
        ("y x", ["x y", "y x"], 1.0),
        ("", "x y", 0.0),
        ("p q", "x y", 0.0),
    ],
)
def test_rouge_l(prediction, ground_truths, expected):
    assert rouge_l(prediction, ground_truths) == pytest.approx(expected)


def test_rouge_l_differs_from_f1_on_order():
    # same bag of words, different order: F1 = 1 but LCS only 1 of 2 tokens
    assert qa_f1("y x", "x y") == 1.0
    assert rouge_l("y x", "x y") == 0.5


CLASSES = ["Food", "Location", "Person", "Other Location"]


@pytest.mark.parametrize(
    ("prediction", "ground_truth", "expected"),
    [
        ("no idea", "Food", 0.0),  # 0 classes matched
        ("Food", "Food", 1.0),  # 1 matched, correct: 1/1
        ("Person", "Food", 0.0),  # 1 matched, wrong
        ("Person or Food", "Food", 0.5),  # 2 matched, truth among them: 1/2
        ("Person or Location", "Food", 0.0),  # 2 matched, truth not among them
        ("Food, Person or Location", "Location", 1 / 3),  # 3 matched: 1/3
        ("food", "Food", 0.0),  # matching is case-sensitive, as in LongBench
        # "Location" and "Other Location" both occur, but "Location" is part of the true class name -> 1/1
        ("Other Location", "Other Location", 1.0),
        # the reverse is a hedge: "Other Location" is not part of "Location" -> 1/2
        ("Other Location", "Location", 0.5),
    ],
)
def test_classification_accuracy(prediction, ground_truth, expected):
    assert classification_accuracy(prediction, ground_truth, CLASSES) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prediction", "ground_truth", "expected"),
    [
        ("There are 4 unique paragraphs.", "4", 1.0),
        ("3 or 4", "4", 0.5),  # numbers [3, 4], one right
        ("I do not know", "4", 0.0),  # no numbers
        ("Paragraph 12", "Paragraph 12", 1.0),
        ("Paragraph 2 or Paragraph 12", "Paragraph 12", 0.5),  # [2, 12]: 12 is not split into 1 and 2
        ("Paragraph 1", "Paragraph 12", 0.0),
        ("段落3", "段落3", 1.0),
    ],
)
def test_count_or_retrieval_score(prediction, ground_truth, expected):
    assert count_or_retrieval_score(prediction, ground_truth) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("", "", 0),
        ("abc", "", 3),  # three deletions
        ("", "abc", 3),
        ("abc", "abc", 0),
        ("kitten", "sitting", 3),  # k->s, e->i, +g
        ("flaw", "lawn", 2),  # -f, +n
        ("sunday", "saturday", 3),  # +a, +t, n->r
    ],
)
def test_levenshtein_known(a, b, expected):
    assert levenshtein(a, b) == expected
    assert levenshtein(b, a) == expected


def _levenshtein_reference(a: str, b: str) -> int:
    @cache
    def d(i: int, j: int) -> int:
        if i == 0:
            return j
        if j == 0:
            return i
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

    return d(len(a), len(b))


def test_levenshtein_matches_bruteforce():
    rng = random.Random(1234)
    for _ in range(300):
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 7)))
        b = "".join(rng.choice("abc") for _ in range(rng.randint(0, 7)))
        assert levenshtein(a, b) == _levenshtein_reference(a, b), (a, b)


@pytest.mark.parametrize(
    ("prediction", "ground_truth", "expected"),
    [
        ("x = foo(1)", "x = foo(1)", 1.0),
        ("kitten", "sitting", 1 - 3 / 7),  # distance 3, longer string 7 chars
        # fence, comment and blank line skipped; indentation stripped -> identical
        ("```python\n# set x\n\n    x = foo(1)\n```", "x = foo(1)", 1.0),
        # '//' comment skipped; "int y = 2;" vs "int y = 3;": 1 substitution / 10 chars
        ("// next line\nint y = 2;", "int y = 3;", 0.9),
        # only the first code line counts: "abc" vs "abd" -> 1 - 1/3
        ("abc\nabd", "abd", 2 / 3),
        ("", "abc", 0.0),  # nothing predicted: distance 3 / 3
        ("```\n# only comments\n```", "abc", 0.0),
        ("", "", 1.0),
    ],
)
def test_edit_similarity(prediction, ground_truth, expected):
    assert edit_similarity(prediction, ground_truth) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prediction", "ground_truths", "expected"),
    [
        ("The Answer.", "answer", 1.0),  # article, case, punctuation normalised away
        ("answer yes", "answer", 0.0),  # extra token -> not equal
        ("yes", ["no", "Yes!"], 1.0),  # any answer
        ("yes", [], 0.0),
    ],
)
def test_exact_match(prediction, ground_truths, expected):
    assert exact_match(prediction, ground_truths) == expected


@pytest.mark.parametrize(
    ("prediction", "ground_truths", "expected"),
    [
        ("The values are 123 and 456.", ["123", "456", "789"], 2 / 3),  # 2 of 3 found
        ("Magic number: ABC-9", "abc-9", 1.0),  # case-insensitive, raw (un-normalised) substring
        ("nothing here", ["123"], 0.0),
        ("anything", [], 0.0),
    ],
)
def test_substring_match(prediction, ground_truths, expected):
    assert substring_match(prediction, ground_truths) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("task", "metric"),
    [
        ("narrativeqa", qa_f1),
        ("qasper", qa_f1),
        ("multifieldqa_en", qa_f1),
        ("hotpotqa", qa_f1),
        ("2wikimqa", qa_f1),
        ("musique", qa_f1),
        ("triviaqa", qa_f1),
        ("gov_report", rouge_l),
        ("qmsum", rouge_l),
        ("multi_news", rouge_l),
        ("samsum", rouge_l),
        ("trec", classification_accuracy),
        ("lsht", classification_accuracy),
        ("passage_count", count_or_retrieval_score),
        ("passage_retrieval_en", count_or_retrieval_score),
        ("lcc", edit_similarity),
        ("repobench-p", edit_similarity),
    ],
)
def test_longbench_table(task, metric):
    assert LONGBENCH_METRICS[task] is metric


@pytest.mark.parametrize(
    ("task", "prediction", "answers", "expected"),
    [
        ("hotpotqa", "the cat sat on mat", ["dog", "cat sat"], 2 / 3),  # max over answers: 0 and 2/3
        ("hotpotqa_e", "cat sat", ["cat sat"], 1.0),  # LongBench-E name maps to its base task
        ("gov_report", "w x y z", ["w y q z q q"], 0.6),  # ROUGE-L example above
        ("passage_retrieval_en", "Paragraph 2 or Paragraph 12", ["Paragraph 12"], 0.5),
        ("lcc", "```\nkitten\n```", ["sitting"], 1 - 3 / 7),
        ("trec", "Person or Food", ["Food"], 0.5),
    ],
)
def test_score_longbench(task, prediction, answers, expected):
    assert score_longbench(task, prediction, answers, all_classes=CLASSES) == pytest.approx(expected)


def test_score_longbench_unknown_task():
    with pytest.raises(ValueError, match=r"Unknown LongBench task 'no_such_task'.*hotpotqa"):
        score_longbench("no_such_task", "x", ["x"])


def test_score_longbench_classification_needs_classes():
    with pytest.raises(ValueError, match="all_classes"):
        score_longbench("trec", "Food", ["Food"])
