"""From judgments to the report's numbers: MT-Bench means over graded answers (FastChat's ``show_result``;
failed judgments counted, never averaged in), exact match, intervals, a table. No data: ``None``, not 0."""

from __future__ import annotations

import re
from statistics import fmean
from typing import Any

from pipeline.digests import digest_of
from pipeline.eval.questions import Question
from pipeline.eval.stats import Units, compare, interval
from pipeline.numbers import last_number, parse_number
from pipeline.tracking import metric_name

Answers = dict[str, dict[str, dict[str, Any]]]  # model -> question id -> FastChat answer record


def _mean(values: list[float]) -> float | None:
    return round(fmean(values), 4) if values else None


def is_exact_match(response: str, expected: str) -> bool:
    """The response is the expected answer (case, quotes, end punctuation, whitespace aside) or ends with it
    ("... so the answer is 42."); or, numeric, its last number equals it ("... she earned $10.00 in total."
    matches "10"), as GSM8K is scored: the reasoning comes first, the answer last."""
    got, want = (re.sub(r"\s+", " ", text.strip().lower()).strip(" \"'`.!") for text in (response, expected))
    if not want:
        return False
    if got == want or (got.endswith(want) and not got[: -len(want)][-1:].isalnum()):
        return True
    number = parse_number(expected)
    return number is not None and last_number(response) == number


def _hits(question: Question, said: list[str]) -> list[float | None]:
    """Per answer turn: 1.0 if it matches its expected answer, 0.0 if not, None if none is expected."""
    expected = [*(question.exact_answer or ()), *[None] * len(said)]
    pairs = zip(said, expected, strict=False)
    return [None if want is None else float(is_exact_match(got, want)) for got, want in pairs]


def _row_mean(rows: list[dict[str, Any]], model: str, field: str, category: str | None = None,
              turn: int | None = None) -> float | None:  # fmt: skip
    """Mean of ``field`` (``score``/``exact``) over the rows of ``category`` and turn index ``turn``."""
    return _mean([v for row in rows if category in (None, row["category"])
                  for i, v in enumerate(row["models"][model][field]) if v is not None and turn in (None, i)])


def aggregate(questions: list[Question], answers: Answers, judgments: list[dict[str, Any]],
              judged_questions: list[Question] | None = None) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Per model: overall/turn/category scores, judge failures, exact match (overall, per category with
    verifiable turns), spread. Only ``judged_questions``' (default: all) categories get a score."""
    judged = questions if judged_questions is None else judged_questions
    rows = per_question(questions, answers, judgments, judged_questions=judged)
    categories = sorted({q.category for q in judged})
    verifiable = sorted({q.category for q in questions if any(a is not None for a in q.exact_answer or ())})
    results: dict[str, dict[str, Any]] = {}
    for model in answers:
        records = [r for r in judgments if r["model"] == model]
        graded = [r for r in records if not r["failed"]]
        spreads = [r["spread"] for r in graded if r.get("spread") is not None and len(r["scores"]) > 1]
        results[model] = {
            "score_overall": _row_mean(rows, model, "score"),
            "score_turn1": _row_mean(rows, model, "score", turn=0),
            "score_turn2": _row_mean(rows, model, "score", turn=1),
            "categories": {c: _row_mean(rows, model, "score", c) for c in categories},
            "judge_failures": len(records) - len(graded),
            "exact_match": _row_mean(rows, model, "exact"),
            "exact_match_categories": {c: _row_mean(rows, model, "exact", c) for c in verifiable},
            "judged": len(records),
            "judge_spread_mean": _mean(spreads),
        }
    return results


def per_question(questions: list[Question], answers: Answers, judgments: list[dict[str, Any]],
                 pair_outcomes: dict[tuple[str, int], int | None] | None = None,
                 judged_questions: list[Question] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """One row per question, what intervals, comparisons and the promote gate use: per model and turn the
    judge score, exact-match hit (1/0), answer length in words (None: none), and ``pair_outcomes``. ``key``
    is the content, not the id: held-out ids count one run's eval rows; content says two runs asked alike."""
    scores = {(r["model"], str(r["question_id"]), r["turn"]): r["score"]
              for r in judgments if not r["failed"]}  # fmt: skip
    judged = {str(q.question_id) for q in (questions if judged_questions is None else judged_questions)}
    rows = []
    for q in questions:
        qid, turns = str(q.question_id), range(1, len(q.turns) + 1)
        key = digest_of([list(q.turns), list(q.exact_answer or ())], compact=False)[:16]
        said = {model: records[qid]["choices"][0]["turns"] for model, records in answers.items()}
        models = {m: {"score": [scores.get((m, qid, t)) for t in turns], "exact": _hits(q, s),
                      "words": [len(text.split()) for text in s]} for m, s in said.items()}  # fmt: skip
        row: dict[str, Any] = {"question_id": q.question_id, "key": key, "category": q.category,
                               "judged": qid in judged, "models": models}  # fmt: skip
        if pair_outcomes:
            row["pairwise"] = [pair_outcomes.get((qid, t)) for t in turns]
        rows.append(row)
    return rows


# metric name (without "<model>.") -> (per-question field, turn index or None for all turns)
_FIELDS = {"score_overall": ("score", None), "score_turn1": ("score", 0), "score_turn2": ("score", 1),
           "categories": ("score", None), "category": ("score", None), "exact_match": ("exact", None),
           "exact_match_categories": ("exact", None)}  # fmt: skip
_NESTED = {"categories": "category", "exact_match_categories": "exact_match"}  # results key -> metric name


def units(rows: list[dict[str, Any]], model: str, metric: str) -> Units | None:
    """Per-question values behind ``<model>.<metric>`` (a results key, or ``category.<c>``/
    ``exact_match.<c>``), or None for a metric that is not a mean over questions."""
    name, _, category = metric.partition(".")
    if name not in _FIELDS or (name in ("categories", "category", "exact_match_categories") and not category):
        return None
    field, turn = _FIELDS[name]
    return {row["key"]: [v if turn in (None, i) else None for i, v in enumerate(row["models"][model][field])]
            for row in rows if model in row["models"] and category in ("", row["category"])}  # fmt: skip


def with_intervals(models: dict[str, dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``models`` with a ``<metric>_ci95`` after each mean over questions; the judged answers' mean words."""
    out: dict[str, dict[str, Any]] = {}
    for model, row in models.items():
        out[model] = entry = {}
        for name, value in row.items():
            entry[name] = value
            if name in _NESTED:
                entry[f"{name}_ci95"] = {c: interval(units(rows, model, f"{name}.{c}") or {}) for c in value}
            elif name in _FIELDS:
                entry[f"{name}_ci95"] = interval(units(rows, model, name) or {})
        words = [w for r in rows if r["judged"] for w in r["models"][model]["words"]]
        entry["mean_answer_words"] = _mean(words)
    return out


def _pair_units(rows: list[dict[str, Any]]) -> Units:
    """Per question with a pairwise verdict: +1/0/-1 per turn (None where there is none)."""
    return {r["key"]: r["pairwise"] for r in rows if any(v is not None for v in r.get("pairwise", ()))}


def comparisons(models: dict[str, dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"tuned-base": {metric: {diff, ci95, n, verdict}}}``, paired over questions; pairwise too."""
    if not {"base", "tuned"} <= set(models):
        return {}
    tuned = models["tuned"]
    names = ["score_overall", "score_turn1", "score_turn2", *[f"categories.{c}" for c in tuned["categories"]],
             "exact_match", *[f"exact_match_categories.{c}" for c in tuned["exact_match_categories"]]]
    found = {n: compare(units(rows, "base", n) or {}, units(rows, "tuned", n) or {}) for n in names}
    outcomes = _pair_units(rows)  # +1/0/-1 per judged turn against 0: win rate - loss rate
    found["pairwise"] = compare({key: [0] * len(turns) for key, turns in outcomes.items()}, outcomes)
    return {"tuned-base": {name: c for name, c in found.items() if c is not None}}


def pairwise_summary(rows: list[dict[str, Any]], failures: int) -> dict[str, Any] | None:
    """Tuned vs base as FastChat's pairwise mode reports it: win/tie/loss rates, intervals, ``failures``."""
    outcomes = _pair_units(rows)
    if not (judged := sum(v is not None for t in outcomes.values() for v in t)):
        return None
    summary: dict[str, Any] = {"turns": judged, "failures": failures}
    for name, value in (("win", 1), ("tie", 0), ("loss", -1)):
        hits = {k: [None if v is None else float(v == value) for v in turns] for k, turns in outcomes.items()}
        summary[f"{name}_rate"] = _mean([h for turns in hits.values() for h in turns if h is not None])
        summary[f"{name}_rate_ci95"] = interval(hits)
    return {"tuned-base": summary}


def flatten_metrics(models: dict[str, dict[str, Any]], keep_none: bool = False) -> dict[str, float | None]:
    """``<model>.<name>`` metrics (``.category.<cat>``, ``.exact_match.<cat>`` per category): the one naming
    of MLflow's metrics, the promote gate and the version tags. No intervals, no None unless ``keep_none``."""
    metrics: dict[str, float | None] = {}
    for model_id, row in models.items():
        for name, value in row.items():
            for cat, number in value.items() if name in _NESTED else [(None, value)]:
                key = f"{model_id}.{name}" if cat is None else f"{model_id}.{_NESTED[name]}.{cat}"
                if isinstance(number, (int, float)) or (number is None and keep_none):
                    metrics[metric_name(key)] = None if number is None else float(number)
    return metrics


def _fmt(value: Any, ci95: list[float] | None = None) -> str:
    text = "–" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)
    return text + (f" [{ci95[0]:.2f}, {ci95[1]:.2f}]" if ci95 and value is not None else "")


_LABELS = {"score_overall": "score (overall)", "score_turn1": "score (turn 1)",
           "score_turn2": "score (turn 2)", "exact_match": "exact match", "judge_failures": "judge failures",
           "mean_answer_words": "mean answer length (words, judged questions)"}  # fmt: skip


def markdown_table(models: dict[str, dict[str, Any]]) -> str:
    """Models side by side: the headline numbers with their 95% intervals, then one row per category."""
    names = list(models)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for name, label in _LABELS.items():
        cells = " | ".join(_fmt(models[m].get(name), models[m].get(f"{name}_ci95")) for m in names)
        lines.append(f"| {label} | {cells} |")
    for key, prefix in (("categories", ""), ("exact_match_categories", "exact match: ")):
        values = [(models[m].get(key, {}), models[m].get(f"{key}_ci95", {})) for m in names]
        for cat in sorted({cat for value, _ in values for cat in value}):
            cells = " | ".join(_fmt(value.get(cat), ci95.get(cat)) for value, ci95 in values)
            lines.append(f"| {prefix}{cat} | {cells} |")
    return "\n".join(lines) + "\n"


def verdict_lines(comparisons: dict[str, Any], pairwise: dict[str, Any] | None) -> str:
    """The report's last section: pairwise rates, then one line per paired comparison."""
    lines = []
    for pair, row in (pairwise or {}).items():
        rates = ", ".join(f"{n} {_fmt(row[f'{n}_rate'], row[f'{n}_rate_ci95'])}"
                          for n in ("win", "tie", "loss"))  # fmt: skip
        lines.append(f"Pairwise judge, {pair.replace('-', ' vs ')} ({row['turns']} turns judged in both "
                     f"orders, {row['failures']} failed): {rates}.\n")  # fmt: skip
    for pair, metrics in comparisons.items():
        lines.append(f"## Verdicts: {pair.replace('-', ' − ')}, paired over the same questions\n")
        for name, c in metrics.items():
            line = "- {}: {:+.3f} [{:+.3f}, {:+.3f}], n={}: {}"
            lines.append(line.format(name, c["diff"], *c["ci95"], c["n"], c["verdict"]))
    return "\n".join(lines) + ("\n" if lines else "")
