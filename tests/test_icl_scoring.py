"""Tests for kvpress_ext.icl.scoring: answer extraction, normalisation, pass@k and reporting.

Expectations are written out by hand or computed independently (brute-force subset enumeration for pass@k), never
by calling the function under test a second way.
"""

from __future__ import annotations

import csv
import itertools
from fractions import Fraction

import pytest

from kvpress_ext.icl.scoring import (
    answers_match,
    default_ks,
    extract_answer,
    format_scores_table,
    normalize_answer,
    pass_at_k,
    score_generations,
    write_scores_csv,
)

# ---------------------------------------------------------------------------------------------------------------------
# extract_answer
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        # nested braces inside the box
        (r"Thus \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"\boxed{\sqrt{\frac{a}{b}}}", r"\sqrt{\frac{a}{b}}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\fbox{7}", "7"),
        (r"\boxed{\boxed{2}}", "2"),
        (r"\boxed 5", "5"),
        # multiple boxes: the last one wins
        (r"first \boxed{1}, corrected: \boxed{2}", "2"),
        (r"\boxed{a} \fbox{b} \boxed{c}", "c"),
        (r"\boxed{x^{2}} then finally \boxed{\frac{3}{4}} done", r"\frac{3}{4}"),
        # unterminated box is ignored (falls through to the previous complete one, or other heuristics)
        (r"\boxed{3} and then \boxed{4", "3"),
        (r"the answer is 12. \boxed{13", "12"),
        (r"we get 9 and \boxed{x+", "9"),
        (r"we get 9 and \boxed{\frac{1}{2}", r"\frac{1}{2}"),  # last-number fallback sees the complete \frac
        # empty box is no answer
        (r"\boxed{} so 6", "6"),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 42.", "42"),
        ("so the answer is $-3$.", "-3"),
        ("Answer: 7", "7"),
        ("ANSWER: 3.5.", "3.5"),
        ("final answer: \\frac{2}{3}", "\\frac{2}{3}"),
        ("Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.", "\\frac{3}{4}"),
        ("Final Answer: The final answer is 10. I hope it is correct.", "10"),
        ("The answer is 1. Wait, recheck. The answer is 2.", "2"),
        ("The answer is:\n\n  $12$\n", "12"),
        ("The answer is **Paris**.", "Paris"),
        ("the answer is 3.14 and nothing else", "3.14 and nothing else"),
        ("answer is \\(5\\)!", "5"),
    ],
)
def test_extract_answer_phrase(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("We have 3 apples and 5 pears, so 8 fruit", "8"),
        ("the total is 1,234,567 dollars", "1,234,567"),
        ("it drops to -7.25 degrees", "-7.25"),
        ("a ratio of 3/4 remains", "3/4"),
        ("10 - 3 = 7", "7"),
        ("value .5 here", ".5"),
        ("x = \u22123", "-3"),  # unicode minus sign
        ("so \\frac{3}{4} of it", "\\frac{3}{4}"),
        ("1, 2, 3", "3"),
    ],
)
def test_extract_last_number(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   \n\t",
        "{}",
        "{{}}{}",
        "}{",
        "no numbers at all",
        "\u043e\u0442\u0432\u0435\u0442 \u4e03",
        "\\boxed{",
        "\\boxed{}",
    ],
)
def test_extract_none(text):
    assert extract_answer(text) is None


def test_extract_non_string_is_none():
    assert extract_answer(None) is None  # type: ignore[arg-type]


def test_extract_unicode_text_answer():
    assert extract_answer("Die Antwort: answer: caf\u00e9 \u00fcber") == "caf\u00e9 \u00fcber"
    assert extract_answer("\\boxed{\u03c0/2}") == "\u03c0/2"


# ---------------------------------------------------------------------------------------------------------------------
# normalize_answer / answers_match
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("2.0", "2"),
        ("  2  ", "2"),
        ("0.5", "1/2"),
        ("1/2", "1/2"),
        ("2/4", "1/2"),
        ("\\frac{1}{2}", "1/2"),
        ("\\dfrac{1}{2}", "1/2"),
        ("\\tfrac{6}{4}", "3/2"),
        ("\\frac12", "1/2"),
        ("-\\frac{3}{6}", "-1/2"),
        ("\\frac{-3}{6}", "-1/2"),
        ("1,000", "1000"),
        ("1,234,567.50", "2469135/2"),
        ("50\\%", "50"),
        ("50%", "50"),
        ("$5$", "5"),
        ("\\$5", "5"),
        ("x = 5", "5"),
        ("y=\\frac{1}{4}", "1/4"),
        ("\\text{East}", "east"),
        ("\\textbf{Yes}", "yes"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("3\\!\\,\\pi", "3\\pi"),
        ("90^\\circ", "90"),
        ("{5}", "5"),
        ("1,2", "1,2"),
        ("-0", "0"),
        ("+7", "7"),
        ("\\boxed{4}", "4"),
        ("", ""),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    "pred, truth",
    [
        ("0.5", "\\frac{1}{2}"),
        ("1/2", "\\dfrac{1}{2}"),
        ("2", "2.0"),
        ("2.000", "2"),
        ("1,000", "1000"),
        ("50\\%", "50"),
        ("50%", "50"),
        ("\\text{East}", "east"),
        ("EAST", "\\text{ east }"),
        ("$x = 3$", "3"),
        ("0.3333333", "\\frac{1}{3}"),  # within 1e-6 relative
        ("1000000.5", "1000000"),  # 5e-7 relative
        ("\\left(1,2\\right)", "(1, 2)"),
        ("\\frac{4}{8}", "0.5"),
    ],
)
def test_answers_match_equal(pred, truth):
    assert answers_match(pred, truth)


@pytest.mark.parametrize(
    "pred, truth",
    [
        ("0.33", "\\frac{1}{3}"),
        ("1/3", "1/2"),
        ("2", "3"),
        ("-2", "2"),
        ("1,2", "12"),
        ("1000002", "1000000"),  # ~2e-6 relative, over the 1e-6 tolerance
        ("west", "east"),
        ("", "0"),
        (None, "1"),
        ("0", "0.0000001"),
        ("\\frac{1}{2}", "\\frac{1}{3}"),
    ],
)
def test_answers_match_unequal(pred, truth):
    assert not answers_match(pred, truth)


def test_answers_match_tolerance_boundary():
    # tolerance is |a - b| <= 1e-6 * max(|a|, |b|); pick values just inside and just outside it.
    assert answers_match("1000000", "1000000.9")  # 0.9e-6 relative
    assert not answers_match("1000000", "1000001.5")  # ~1.5e-6 relative


# ---------------------------------------------------------------------------------------------------------------------
# pass@k
# ---------------------------------------------------------------------------------------------------------------------


def brute_force_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Fraction of k-subsets of n samples (first c correct) that contain at least one correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    hits = sum(1 for s in subsets if any(i < c for i in s))
    return Fraction(hits, len(subsets))


@pytest.mark.slow
@pytest.mark.parametrize(
    "n, c, k",
    [(n, c, k) for n in range(1, 9) for c in range(n + 1) for k in range(1, n + 1)],
)
def test_pass_at_k_matches_brute_force(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(float(brute_force_pass_at_k(n, c, k)), abs=1e-12)


@pytest.mark.parametrize("n, k", [(1, 1), (5, 1), (5, 5), (100, 10), (1000, 1000)])
def test_pass_at_k_all_wrong_is_zero(n, k):
    assert pass_at_k(n, 0, k) == 0.0


@pytest.mark.parametrize("n, k", [(1, 1), (5, 1), (5, 5), (100, 10), (1000, 1000)])
def test_pass_at_k_all_right_is_one(n, k):
    assert pass_at_k(n, n, k) == 1.0


@pytest.mark.parametrize("n, c", [(10, 3), (7, 7), (64, 1)])
def test_pass_at_1_is_fraction_correct(n, c):
    assert pass_at_k(n, c, 1) == pytest.approx(c / n)


def test_pass_at_k_large_n_is_stable():
    # 1 - C(900, 50) / C(1000, 50) computed exactly with integers.
    from math import comb

    exact = 1 - Fraction(comb(900, 50), comb(1000, 50))
    assert pass_at_k(1000, 100, 50) == pytest.approx(float(exact), rel=1e-12)


@pytest.mark.parametrize(
    "n, c, k",
    [(3, 1, 4), (3, 1, 0), (3, 4, 1), (-1, 0, 1), (3, -1, 1), (3, 1, -2), (0, 0, 1)],
)
def test_pass_at_k_invalid_values(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


@pytest.mark.parametrize("n, c, k", [(3.0, 1, 1), (3, 1.5, 1), (3, 1, True)])
def test_pass_at_k_non_int(n, c, k):
    with pytest.raises(TypeError):
        pass_at_k(n, c, k)


@pytest.mark.parametrize(
    "n, expected",
    [(0, []), (1, [1]), (2, [1, 2]), (5, [1, 2, 4, 5]), (8, [1, 2, 4, 8]), (10, [1, 2, 4, 8, 10])],
)
def test_default_ks(n, expected):
    assert default_ks(n) == expected


# ---------------------------------------------------------------------------------------------------------------------
# score_generations
# ---------------------------------------------------------------------------------------------------------------------


def _uneven_records():
    return [
        # n=2, 1 correct (second generation boxed 5 matches "5")
        {"question": "q0", "answer": "5", "generations": ["The answer is 4.", "\\boxed{5}"]},
        # n=4, 2 correct (0.5 and \frac{1}{2} both match 1/2)
        {
            "question": "q1",
            "answer": "\\frac{1}{2}",
            "generations": ["so 0.5", "\\boxed{\\dfrac{1}{2}}", "answer: 1/3", "nothing here"],
        },
        # n=8, 0 correct
        {"question": "q2", "answer": "10", "generations": ["\\boxed{9}"] * 8},
    ]


def test_score_generations_uneven_counts():
    result = score_generations(_uneven_records())
    assert result["n_questions"] == 3
    assert result["ks"] == [1, 2, 4, 8]
    assert [q["n"] for q in result["per_question"]] == [2, 4, 8]
    assert [q["correct"] for q in result["per_question"]] == [1, 2, 0]
    assert result["total_samples"] == 14
    assert result["total_correct"] == 3
    assert result["per_question"][1]["predictions"] == ["0.5", "\\dfrac{1}{2}", "1/3", None]

    summary = result["pass_at_k"]
    # k=1: mean of c/n over all three questions
    assert summary[1]["n_questions"] == 3
    assert summary[1]["mean"] == pytest.approx((1 / 2 + 2 / 4 + 0) / 3)
    # k=2: q0 -> 1 (only one 2-subset, it contains the correct one); q1 -> 1 - C(2,2)/C(4,2) = 5/6; q2 -> 0
    assert summary[2]["n_questions"] == 3
    assert summary[2]["mean"] == pytest.approx((1 + 5 / 6 + 0) / 3)
    # k=4: only q1 (n=4 -> 1) and q2 (n=8 -> 0) have four samples
    assert summary[4]["n_questions"] == 2
    assert summary[4]["mean"] == pytest.approx(0.5)
    # k=8: only q2
    assert summary[8]["n_questions"] == 1
    assert summary[8]["mean"] == pytest.approx(0.0)
    # per-question pass@k only lists the k values the question can support
    assert sorted(result["per_question"][0]["pass_at_k"]) == [1, 2]
    assert sorted(result["per_question"][2]["pass_at_k"]) == [1, 2, 4, 8]


def test_score_generations_explicit_ks_beyond_all():
    result = score_generations(_uneven_records(), ks=[3, 1, 3, 16])
    assert result["ks"] == [1, 3, 16]
    assert result["pass_at_k"][16] == {"mean": None, "n_questions": 0}
    # k=3 over q1 (n=4, c=2 -> 1 - C(2,3)/C(4,3) = 1) and q2 (0)
    assert result["pass_at_k"][3]["n_questions"] == 2
    assert result["pass_at_k"][3]["mean"] == pytest.approx(0.5)


@pytest.mark.parametrize("ks", [[0], [-1], [1.5], ["2"]])
def test_score_generations_bad_ks(ks):
    with pytest.raises(ValueError):
        score_generations(_uneven_records(), ks=ks)


def test_score_generations_empty_and_missing():
    empty = score_generations([])
    assert empty["n_questions"] == 0 and empty["ks"] == [] and empty["pass_at_k"] == {}
    result = score_generations([{"question": "q", "answer": 3, "generations": ["3", None, ""]}])
    assert result["per_question"][0]["correct"] == 1
    assert result["per_question"][0]["predictions"] == ["3", None, None]


# ---------------------------------------------------------------------------------------------------------------------
# CSV and table output
# ---------------------------------------------------------------------------------------------------------------------


def test_write_scores_csv_roundtrip(tmp_path):
    result = score_generations(_uneven_records(), ks=[1, 2, 4, 8, 16])
    path = write_scores_csv(result, tmp_path / "sub" / "scores.csv")
    assert path.exists()
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["k"]) for r in rows] == [1, 2, 4, 8, 16]
    assert [int(r["n_questions"]) for r in rows] == [3, 3, 2, 1, 0]
    assert {int(r["total_questions"]) for r in rows} == {3}
    expected = [(1 / 2 + 2 / 4) / 3, (1 + 5 / 6) / 3, 0.5, 0.0]
    for row, want in zip(rows[:4], expected):
        assert float(row["pass_at_k"]) == pytest.approx(want, abs=1e-12)
    assert rows[4]["pass_at_k"] == ""


def test_format_scores_table():
    result = score_generations(_uneven_records(), ks=[1, 2, 4, 8, 16])
    table = format_scores_table(result)
    lines = table.splitlines()
    assert "questions: 3" in lines[0]
    assert "samples/question: 2-8" in lines[0]
    assert "3/14" in lines[0]
    body = {int(ln.split()[0]): ln.split()[1:] for ln in lines[3:] if ln.strip() and ln.split()[0].isdigit()}
    assert body[1] == [f"{(1 / 2 + 2 / 4) / 3:.4f}", "3"]
    assert body[2] == [f"{(1 + 5 / 6) / 3:.4f}", "3"]
    assert body[4] == ["0.5000", "2*"]
    assert body[8] == ["0.0000", "1*"]
    assert body[16] == ["n/a", "0*"]
    # fixed width: all table rows have the same length
    assert len({len(ln.rstrip("*")) for ln in lines[1:8]}) == 1
    assert lines[-1].startswith("*")
