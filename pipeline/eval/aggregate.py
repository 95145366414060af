"""From judgments to the numbers in the report: MT-Bench averages, exact match, a Markdown table.

Averages follow FastChat's ``show_result``: a model's turn-1 (turn-2) score is the mean over its
graded turn-1 (turn-2) answers, the overall score is the mean over all graded answers, a category
score the mean over that category's graded answers (both turns). Failed judgments are counted,
never averaged in. A number with nothing behind it is ``None`` (null in JSON), not 0.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from statistics import fmean
from typing import Any

from pipeline.eval.questions import Question
from pipeline.numbers import last_number, parse_number

SCORE_FIELDS = ("score_overall", "score_turn1", "score_turn2", "judge_failures", "exact_match")


def _mean(values: list[float]) -> float | None:
    return round(fmean(values), 4) if values else None


def normalise(text: str) -> str:
    """Case, surrounding quotes/backticks/punctuation and inner whitespace do not matter."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text.strip(" \"'`.!")


# A number as a model writes it: optional sign and "$", thousands commas, decimals. The minus must
# not follow a word or digit character ("pages 10-12" ends with 12, not -12).
def is_exact_match(response: str, expected: str) -> bool:
    """The response is the expected answer, or ends with it ("... so the answer is 42."); or, for a
    numeric expected answer, the response's last number equals it ("... she earned $10.00 in
    total." matches "10"), as GSM8K is scored: the reasoning comes first, the answer last."""
    got, want = normalise(response), normalise(expected)
    if not want:
        return False
    if got == want or (got.endswith(want) and not got[: -len(want)][-1:].isalnum()):
        return True
    number = parse_number(expected)
    return number is not None and last_number(response) == number


def _verifiable_turns(question: Question, turns: list[str]) -> list[tuple[str, str]]:
    """(expected, response) for each answered turn of ``question`` that has an expected answer."""
    return [(e, r) for e, r in zip(question.exact_answer or (), turns, strict=False) if e is not None]


def exact_match(questions: Iterable[Question], answers: dict[str, dict[str, Any]]) -> float | None:
    """Share of verifiable answer turns that match their expected answer; None if none is verifiable."""
    hits: list[float] = []
    for q in questions:
        turns = answers[str(q.question_id)]["choices"][0]["turns"] if q.exact_answer else []
        hits += [1.0 if is_exact_match(r, e) else 0.0 for e, r in _verifiable_turns(q, turns)]
    return _mean(hits)


def exact_match_by_category(
    questions: Iterable[Question], answers: dict[str, dict[str, Any]]
) -> dict[str, float | None]:
    """``exact_match`` per category, for the categories that have verifiable turns (sorted)."""
    by_category: dict[str, list[Question]] = defaultdict(list)
    for q in questions:
        if q.exact_answer and any(a is not None for a in q.exact_answer):
            by_category[q.category].append(q)
    return {cat: exact_match(by_category[cat], answers) for cat in sorted(by_category)}


def aggregate(
    questions: list[Question],
    answers: dict[str, dict[str, dict[str, Any]]],
    judgments: list[dict[str, Any]],
    judged_questions: list[Question] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per model: overall/turn-1/turn-2/per-category scores, judge failures, exact match (overall
    and per category), spread.

    ``judged_questions`` (default: all) are those sent to the judge: only their categories get a
    judge-score entry, so questions scored by exact match alone add no empty axis to the report.
    A model without any judgment gets None scores, not an error.
    """
    judged_categories = sorted(
        {q.category for q in (questions if judged_questions is None else judged_questions)}
    )
    by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in judgments:
        by_model[record["model"]].append(record)
    results: dict[str, dict[str, Any]] = {}
    for model_id in answers:
        records = by_model.get(model_id, [])
        graded = [r for r in records if not r["failed"]]
        categories: dict[str, list[float]] = defaultdict(list)
        for r in graded:
            categories[r["category"]].append(r["score"])
        spreads = [
            r["spread"] for r in graded if r.get("spread") is not None and len(r.get("scores", [])) > 1
        ]
        results[model_id] = {
            "score_overall": _mean([r["score"] for r in graded]),
            "score_turn1": _mean([r["score"] for r in graded if r["turn"] == 1]),
            "score_turn2": _mean([r["score"] for r in graded if r["turn"] == 2]),
            "categories": {cat: _mean(categories[cat]) for cat in judged_categories},
            "judge_failures": sum(1 for r in records if r["failed"]),
            "exact_match": exact_match(questions, answers[model_id]),
            "exact_match_categories": exact_match_by_category(questions, answers[model_id]),
            "judged": len(records),
            "judge_spread_mean": _mean(spreads),
        }
    return results


def metric_name(name: str) -> str:
    """``name`` with every character MLflow refuses in a metric name (it allows letters, digits,
    ``_ - . / `` and space) replaced by ``_``; categories come from data (source labels)."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def flatten_metrics(models: dict[str, dict[str, Any]], keep_none: bool = False) -> dict[str, float | None]:
    """``<model>.<name>`` metrics (``<model>.category.<cat>`` per judged category,
    ``<model>.exact_match.<cat>`` per verifiable category): the one naming of MLflow's metrics, the
    promote gate and the version tags. None values are left out unless ``keep_none``."""
    metrics: dict[str, float | None] = {}
    nested = {"categories": "category", "exact_match_categories": "exact_match"}
    for model_id, row in models.items():
        for name, value in row.items():
            for cat, number in value.items() if name in nested else [(None, value)]:
                key = f"{model_id}.{name}" if cat is None else f"{model_id}.{nested[name]}.{cat}"
                if number is not None or keep_none:
                    metrics[metric_name(key)] = None if number is None else float(number)
    return metrics


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def markdown_table(models: dict[str, dict[str, Any]]) -> str:
    """Models side by side: the headline numbers, then one row per category."""
    names = list(models)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    labels = {
        "score_overall": "score (overall)",
        "score_turn1": "score (turn 1)",
        "score_turn2": "score (turn 2)",
        "exact_match": "exact match",
        "judge_failures": "judge failures",
    }
    for name, label in labels.items():
        lines.append(f"| {label} | " + " | ".join(_fmt(models[m][name]) for m in names) + " |")
    for key, prefix in (("categories", ""), ("exact_match_categories", "exact match: ")):
        categories = sorted({cat for m in names for cat in models[m].get(key, {})})
        for cat in categories:
            cells = " | ".join(_fmt(models[m].get(key, {}).get(cat)) for m in names)
            lines.append(f"| {prefix}{cat} | {cells} |")
    return "\n".join(lines) + "\n"
