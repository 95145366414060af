"""Aggregation against hand-computed numbers; exact match; metric flattening; the Markdown table."""

from __future__ import annotations

from decimal import Decimal

import pytest

from pipeline.eval.aggregate import (
    aggregate,
    flatten_metrics,
    is_exact_match,
    markdown_table,
)
from pipeline.eval.judging import verdict
from pipeline.eval.questions import Question
from pipeline.numbers import canonical, last_number, parse_number

QUESTIONS = [
    Question(1, "math", ("What is 6*7?", "Only the number."), ("42", "42"), ("42", "42")),
    Question(2, "writing", ("Write a haiku.", "Make it sadder.")),
]


def _answers(q1, q2):
    return {"1": {"choices": [{"turns": q1}]}, "2": {"choices": [{"turns": q2}]}}


def _judgment(model, qid, turn, outputs):
    category = "math" if qid == 1 else "writing"
    return {"model": model, "question_id": qid, "turn": turn, "category": category, **verdict(outputs)}


def test_verdict_median_spread_and_failure():
    assert verdict(["Rating: [[5]]", "[[3]]", "[[7]]"]) | {} == {
        "score": 5.0,
        "scores": [5.0, 3.0, 7.0],
        "spread": 4.0,
        "failed": False,
        "failed_samples": 0,
    }
    assert verdict(["[[4]]", "no idea"])["score"] == 4.0
    assert verdict(["[[4]]", "no idea"])["failed_samples"] == 1
    failed = verdict(["I refuse", "[[12]]"])
    assert failed["failed"] and failed["score"] is None


def test_aggregate_matches_hand_computed_numbers():
    answers = {
        "base": _answers(["The answer is 42.", "41"], ["a", "b"]),
        "tuned": _answers(["42", "42"], ["c", "d"]),
    }
    judgments = [
        _judgment("base", 1, 1, ["[[4]]"]),
        _judgment("base", 1, 2, ["[[6]]"]),
        _judgment("base", 2, 1, ["[[8]]"]),
        _judgment("base", 2, 2, ["unparseable"]),
        _judgment("tuned", 1, 1, ["[[7]]"]),
        _judgment("tuned", 1, 2, ["[[rating]]"]),
        _judgment("tuned", 2, 1, ["[[9]]"]),
        _judgment("tuned", 2, 2, ["[[5]]", "[[3]]", "[[7]]"]),
    ]
    models = aggregate(QUESTIONS, answers, judgments)
    base, tuned = models["base"], models["tuned"]
    # base: graded 4, 6, 8 -> overall 6; turn 1: (4+8)/2; turn 2: 6; math (4+6)/2; writing 8
    assert base["score_overall"] == pytest.approx(6.0)
    assert base["score_turn1"] == pytest.approx(6.0)
    assert base["score_turn2"] == pytest.approx(6.0)
    assert base["categories"] == {"math": 5.0, "writing": 8.0}
    assert base["judge_failures"] == 1
    assert base["exact_match"] == pytest.approx(0.5)  # "The answer is 42." matches, "41" does not
    assert base["judge_spread_mean"] is None  # one sample each: no spread to report
    # tuned: graded 7, 9, median(5,3,7)=5 -> overall 7; turn 1 (7+9)/2 = 8; turn 2: 5
    assert tuned["score_overall"] == pytest.approx(7.0)
    assert tuned["score_turn1"] == pytest.approx(8.0)
    assert tuned["score_turn2"] == pytest.approx(5.0)
    assert tuned["categories"] == {"math": 7.0, "writing": 7.0}
    assert tuned["judge_failures"] == 1
    assert tuned["exact_match"] == pytest.approx(1.0)
    assert tuned["judge_spread_mean"] == pytest.approx(4.0)

    metrics = flatten_metrics(models)
    assert metrics["tuned.score_overall"] == pytest.approx(7.0)
    assert metrics["base.category.writing"] == pytest.approx(8.0)
    assert metrics["base.judge_failures"] == 1.0
    assert "base.judge_spread_mean" not in metrics  # None is left out, never logged as 0

    table = markdown_table(models)
    assert "| metric | base | tuned |" in table
    assert "| score (overall) | 6.00 | 7.00 |" in table
    assert "| math | 5.00 | 7.00 |" in table


def test_all_failed_gives_null_scores_not_zero():
    answers = {"base": _answers(["x", "y"], ["a", "b"])}
    judgments = [_judgment("base", q, t, ["nothing"]) for q in (1, 2) for t in (1, 2)]
    row = aggregate(QUESTIONS, answers, judgments)["base"]
    assert row["score_overall"] is None and row["score_turn1"] is None
    assert row["categories"] == {"math": None, "writing": None}
    assert row["judge_failures"] == 4
    assert aggregate(QUESTIONS[1:], {"base": _answers([], ["a", "b"])}, [])["base"]["exact_match"] is None


@pytest.mark.parametrize(
    ("response", "expected", "match"),
    [
        ("42", "42", True),
        ("  42.  ", "42", True),
        ("So the answer is 42.", "42", True),
        ("The total is 142", "42", False),
        # the last-number rule (GSM8K scoring): a numeric answer followed by its unit matches
        ("42 apples", "42", True),
        ("42 apples", "forty-two", False),
        ('"HELLO world"', "hello world", True),
        ('{"a": 1}', '{"a": 1}', True),
        ("", "42", False),
    ],
)
def test_exact_match_rule(response, expected, match):
    assert is_exact_match(response, expected) is match


@pytest.mark.parametrize(
    ("response", "expected", "match"),
    [
        ("... so she earned $10.", "10", True),
        ("She earned 10.00 dollars in total.", "10", True),
        ("The answer is 1,000", "1000", True),
        ("The answer is 1000.", "1,000", True),
        ("It costs $12 each", "$12", True),
        ("The temperature fell to -3 degrees.", "-3", True),
        ("Half: 0.5", "0.5", True),
        ("I got 5 then 72", "72", True),
        ("72 then 5", "72", False),
        ("72 clips", "27", False),
        ("She sold 72 clips.", "72.5", False),
        ("pages 10-12", "-12", False),  # a hyphen between numbers is no minus sign
        ("pages 10-12", "12", True),
        ("He has 3 apples", "-3", False),
        ("no number here", "10", False),
        ("The code is 1,2,3", "123", False),  # not a thousands separator
        ("#### 18", "18", True),
    ],
)
def test_numeric_last_number_rule(response, expected, match):
    assert is_exact_match(response, expected) is match


def test_parse_number_accepts_only_whole_numbers():
    assert [parse_number(t) for t in ("1,000", "$12", "-3", "0.5", " 10. ")] == [
        Decimal(1000), Decimal(12), Decimal(-3), Decimal("0.5"), Decimal(10)
    ]  # fmt: skip
    assert [parse_number(t) for t in ("72 clips", "1,00", "hello", "", "1.2.3")] == [None] * 5


def test_exact_match_per_category_flattened_with_safe_metric_names():
    questions = [
        Question("heldout-gsm8k-0", "gsm8k", ("q",), exact_answer=("72",)),
        Question("heldout-gsm8k-1", "gsm8k", ("q",), exact_answer=("10",)),
        Question("heldout-a:b-0", "a:b (v2)", ("q",), exact_answer=("x",)),
        Question(3, "writing", ("w",)),
        Question(4, "math", ("m1", "m2"), exact_answer=(None, "7")),
    ]
    answers = {
        "heldout-gsm8k-0": {"choices": [{"turns": ["so 72 clips"]}]},
        "heldout-gsm8k-1": {"choices": [{"turns": ["about 11"]}]},
        "heldout-a:b-0": {"choices": [{"turns": ["X"]}]},
        "3": {"choices": [{"turns": ["words"]}]},
        "4": {"choices": [{"turns": ["7", "8"]}]},
    }
    # nothing was judged: scores are None (not an error), judge categories only for judged questions
    row = aggregate(questions, {"tuned": answers}, [], judged_questions=[questions[3]])["tuned"]
    assert row["score_overall"] is None and row["judged"] == 0
    assert row["categories"] == {"writing": None}
    assert row["exact_match"] == pytest.approx(0.5)  # 2 of 4 verifiable turns
    assert row["exact_match_categories"] == {"a:b (v2)": 1.0, "gsm8k": 0.5, "math": 0.0}
    metrics = flatten_metrics({"tuned": row})
    assert {k: v for k, v in metrics.items() if ".exact_match" in k} == {
        "tuned.exact_match": 0.5,
        "tuned.exact_match.a_b _v2_": 1.0,  # MLflow refuses ":" and "()"
        "tuned.exact_match.gsm8k": 0.5,
        "tuned.exact_match.math": 0.0,
    }
    assert not any(k.startswith("tuned.category.") for k in metrics)  # writing has no score
    table = markdown_table({"tuned": row})
    assert "| exact match: gsm8k | 0.50 |" in table and "| writing | – |" in table


def test_last_number_and_its_canonical_spelling():
    assert last_number("48/2 = 24 clips; 48+24 = 72 clips altogether.") == Decimal(72)
    assert last_number("pages 10-12") == Decimal(12)  # a range, not minus twelve
    assert last_number("no digits here") is None
    assert [canonical(Decimal(t)) for t in ("72.00", "0.50", "-3", "1000", "-0.0")] == [
        "72", "0.5", "-3", "1000", "0"
    ]  # fmt: skip
