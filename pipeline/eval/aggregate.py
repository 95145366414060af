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

SCORE_FIELDS = ("score_overall", "score_turn1", "score_turn2", "judge_failures", "exact_match")


def _mean(values: list[float]) -> float | None:
    return round(fmean(values), 4) if values else None


def normalise(text: str) -> str:
    """Case, surrounding quotes/backticks/punctuation and inner whitespace do not matter."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text.strip(" \"'`.!")


def is_exact_match(response: str, expected: str) -> bool:
    """The response is the expected answer, or ends with it ("... so the answer is 42.")."""
    got, want = normalise(response), normalise(expected)
    if not want:
        return False
    return got == want or (got.endswith(want) and not got[: -len(want)][-1:].isalnum())


def exact_match(questions: Iterable[Question], answers: dict[str, dict[str, Any]]) -> float | None:
    """Share of verifiable answer turns that match their expected answer; None if none is verifiable."""
    hits: list[float] = []
    for q in questions:
        if not q.exact_answer:
            continue
        turns = answers[str(q.question_id)]["choices"][0]["turns"]
        for expected, response in zip(q.exact_answer, turns, strict=False):
            if expected is not None:
                hits.append(1.0 if is_exact_match(response, expected) else 0.0)
    return _mean(hits)


def aggregate(
    questions: list[Question],
    answers: dict[str, dict[str, dict[str, Any]]],
    judgments: list[dict[str, Any]],
) -> dict[str, dict[str, Any]]:
    """Per model: overall/turn-1/turn-2/per-category scores, judge failures, exact match, spread."""
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
            "categories": {cat: _mean(categories[cat]) for cat in sorted({q.category for q in questions})},
            "judge_failures": sum(1 for r in records if r["failed"]),
            "exact_match": exact_match(questions, answers[model_id]),
            "judged": len(records),
            "judge_spread_mean": _mean(spreads),
        }
    return results


def flatten_metrics(models: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``<model>.<name>`` metrics (``<model>.category.<cat>`` per category); None values are left out."""
    metrics: dict[str, float] = {}
    for model_id, row in models.items():
        for name, value in row.items():
            if name == "categories":
                for cat, score in value.items():
                    if score is not None:
                        metrics[f"{model_id}.category.{cat}"] = float(score)
            elif value is not None:
                metrics[f"{model_id}.{name}"] = float(value)
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
    categories = sorted({cat for m in names for cat in models[m]["categories"]})
    for cat in categories:
        lines.append(f"| {cat} | " + " | ".join(_fmt(models[m]["categories"].get(cat)) for m in names) + " |")
    return "\n".join(lines) + "\n"
