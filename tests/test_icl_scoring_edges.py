"""Answer extraction, normalisation, pass@k and reports at their edges (cases mutation testing found unchecked)."""

from __future__ import annotations

import pytest

from kvpress_ext.icl.scoring import (
    answers_match,
    extract_answer,
    format_scores_table,
    normalize_answer,
    pass_at_k,
    score_generations,
    write_scores_csv,
)


@pytest.mark.parametrize("text, expected", [
    # the marker ends its line: the next non-empty line is the answer
    ("Let me think.\nThe answer is:\nBlue whale.\nThat is all.", "Blue whale"),
    ("3 apples. The answer is:\n   \n", "3"),  # nothing after the marker: fall back to the last number
    # a math span after the marker: exactly the span, commentary after it dropped
    ("The answer is $$\\frac{1}{2}$$ I hope it is correct.", "\\frac{1}{2}"),
    ("The answer is $x$ and $y$.", "x"),
    ("The answer is $XY$.", "XY"),
    ("The answer is $42", "42"),  # an unclosed span: all of it
    ("The answer is $east", "east"),
    ("The answer is Blue whale\nThat is all", "Blue whale"),  # the rest of the marker's line only
    # delimiters and markdown around a plain phrase
    ("The answer is: **X**.", "X"),
    ("The answer is: **$x$**.", "x"),
    ("The answer is: \\[x\\].", "x"),
    ("The answer is: *$x+1*", "x+1"),
    ("The answer is: x$.", "x"),
    ("The answer is: xy$.", "xy"),
    ("The answer is: a$b.", "a$b"),
    ("The answer is: *$$*", None),
    # boxes without braces, escaped braces, adjacent and nested boxes
    ("so \\boxed east.", "east"),
    ("so \\boxed east then \\boxed{west}", "west"),
    ("\\boxed5 then 7", "7"),  # \boxed5 is not a box: the last number
    ("\\boxed{a}\\boxed{b}", "b"),
    ("\\boxed{a\\{b}", "a\\{b"),
    ("\\boxed{\\boxed{42}}", "42"),
    ("\\boxed{\\boxed{east}}", "east"),
])
def test_extract_answer_edges(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("raw, expected", [
    (None, ""),
    ("east.", "east"),
    ("\\(x+1\\)", "x+1"),
    ("\\displaystyle x", "x"),
    ("90\u00b0", "90"),
    ("a}{{}", "a}{{}"),  # not one braced group: braces kept
    ("\\text{abc", "\\text{abc"),  # an unterminated wrapper is left alone
    ("\\text{a \\text{b}", "\\text{ab"),  # ... and later wrappers are still unwrapped
    ("\\text{a}b", "ab"),
    # commands that merely start like a known one are other commands: untouched
    ("\\leftX", "\\leftx"), ("\\rightarrow", "\\rightarrow"), ("\\displaystyleZ", "\\displaystylez"),
    ("\\dfracA", "\\dfraca"), ("\\textsc{x}", "\\textsc{x}"), ("\\textSC{x}", "\\textsc{x}"),
    ("1/0", "1/0"),  # not a number
    ("3/1", "3"),
])
def test_normalize_answer_edges(raw, expected):
    assert normalize_answer(raw) == expected


def test_matching_edges():
    assert answers_match("3/1", "3")
    assert not answers_match("1/0", "2/0")
    assert not answers_match("None", None) and not answers_match(None, "None")
    # the relative tolerance is inclusive: a difference of exactly 1e-6 of the larger value matches
    assert answers_match("999999", "1000000") and answers_match("4000000", "3999996")
    assert not answers_match("999998", "1000000")


@pytest.mark.parametrize("args, error, message", [
    ((2.0, 1, 1), TypeError, "n must be an int, got float"),
    ((4, "1", 1), TypeError, "c must be an int, got str"),
    ((4, 1, True), TypeError, "k must be an int, got bool"),
    ((4, -1, 1), ValueError, "c must be non-negative, got -1"),
    ((4, 1, 0), ValueError, "k must be >= 1, got 0"),
    ((4, 1, 5), ValueError, "k=5 exceeds the number of samples n=4"),
    ((4, 5, 1), ValueError, "c=5 exceeds the number of samples n=4"),
])
def test_pass_at_k_messages(args, error, message):
    with pytest.raises(error) as err:
        pass_at_k(*args)
    assert str(err.value) == message


def test_score_generations_records_and_bad_k():
    result = score_generations([{"question": "q?", "answer": "5", "generations": ["\\boxed{5}", "no", 7]}], ks=[1])
    q = result["per_question"][0]
    assert {k: q[k] for k in ("index", "question", "answer", "n", "correct", "predictions")} == {
        "index": 0, "question": "q?", "answer": "5", "n": 3, "correct": 1, "predictions": ["5", None, None]}
    with pytest.raises(ValueError) as err:
        score_generations([], ks=[2, 0])
    assert str(err.value) == "every k must be a positive int, got 0"


def test_reports_of_minimal_results(tmp_path):
    assert format_scores_table({}) == (
        "questions: 0   samples/question: 0   correct samples: 0/0\n"
        "     k    pass@k  questions\n"
        "------  --------  ---------")
    result = score_generations([{"answer": "1", "generations": ["1", "2"]}, {"answer": "2", "generations": ["2", "2"]}])
    assert format_scores_table(result) == (
        "questions: 2   samples/question: 2   correct samples: 3/4\n"
        "     k    pass@k  questions\n"
        "------  --------  ---------\n"
        "     1    0.7500          2\n"
        "     2    1.0000          2")
    partial = score_generations([{"answer": "1", "generations": ["1"]}, {"answer": "2", "generations": ["2", "1"]}])
    assert format_scores_table(partial) == (  # only the second question has 2 samples
        "questions: 2   samples/question: 1-2   correct samples: 2/3\n"
        "     k    pass@k  questions\n"
        "------  --------  ---------\n"
        "     1    0.7500          2\n"
        "     2    1.0000          1*\n"
        "* averaged only over questions with at least k samples")

    single = score_generations([{"answer": "1", "generations": ["1", "1", "0"]}], ks=[1])
    assert format_scores_table(single).splitlines()[0] == "questions: 1   samples/question: 3   correct samples: 2/3"

    path = tmp_path / "new" / "deeper" / "scores.csv"  # parent folders are created
    write_scores_csv({"ks": [1], "pass_at_k": {1: {"mean": 0.5, "n_questions": 1}}}, path)
    assert path.read_bytes() == b"k,pass_at_k,n_questions,total_questions\r\n1,0.5,1,0\r\n"
    write_scores_csv({}, path)  # the folder exists now: fine
    assert path.read_bytes() == b"k,pass_at_k,n_questions,total_questions\r\n"
