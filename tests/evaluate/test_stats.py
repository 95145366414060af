"""Bootstrap intervals and paired comparisons against values computed by hand (an explicit loop over
the same seeded resample indices, a hand-written percentile), and the per-question rows they come
from: intervals in results, tuned-base comparisons, pairwise judging where position bias is a tie."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.eval.aggregate import (
    aggregate,
    comparisons,
    pairwise_summary,
    per_question,
    units,
    verdict_lines,
    with_intervals,
)
from pipeline.eval.judging import build_pair_tasks, pair_outcomes, run_judging
from pipeline.eval.prompts import load_prompts
from pipeline.eval.questions import Question
from pipeline.eval.stats import RESAMPLES, SEED, compare, interval


def hand_indices(n, seed=SEED):
    """The resample scheme, spelled out: RESAMPLES rows of n indices drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(RESAMPLES, n))


def hand_percentile(values, q):
    """Linear interpolation between order statistics (numpy's default), written out."""
    ordered = sorted(v for v in values if not math.isnan(v))
    position = q / 100 * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def hand_mean(questions, picks):
    values = [v for i in picks for v in questions[i] if v is not None]
    return sum(values) / len(values) if values else math.nan


# Hand-made per-question scores: two turns each, some turns without a value.
SCORES = {"q1": [4.0, 6.0], "q2": [8.0, None], "q3": [3.0, 5.0], "q4": [9.0, 7.0], "q5": [2.0, None],
          "q6": [6.5, 7.5]}  # fmt: skip


def test_interval_equals_the_hand_computed_bootstrap():
    questions = list(SCORES.values())
    means = [hand_mean(questions, row) for row in hand_indices(len(questions))]
    expected = [round(hand_percentile(means, 2.5), 4), round(hand_percentile(means, 97.5), 4)]
    assert interval(SCORES) == expected
    assert interval(SCORES) == interval(dict(SCORES))  # seeded: the same every time
    assert expected[0] < 60 / 10 < expected[1]  # the point estimate (mean of all 10 values) inside
    # fewer than 6 questions with a value: no interval (one question's bootstrap is a point)
    assert interval({**SCORES, "q6": [None, None]}) is None and interval({}) is None


def test_paired_difference_equals_the_hand_computed_bootstrap():
    base = {"a": [1.0, 0.0], "b": [0.0, 0.0], "c": [1.0, 1.0], "d": [0.0, None], "e": [0.0, 0.0],
            "f": [1.0, 0.0], "only-base": [1.0, 1.0]}  # fmt: skip
    tuned = {"a": [1.0, 1.0], "b": [1.0, 0.0], "c": [1.0, 1.0], "d": [1.0, 1.0], "e": [0.0, 1.0],
             "f": [1.0, 0.0], "only-tuned": [0.0, 0.0]}  # fmt: skip
    # pairs: shared questions a-f; turns both have (d's second turn has no base value)
    shared = [[(1.0, 1.0), (0.0, 1.0)], [(0.0, 1.0), (0.0, 0.0)], [(1.0, 1.0), (1.0, 1.0)], [(0.0, 1.0)],
              [(0.0, 0.0), (0.0, 1.0)], [(1.0, 1.0), (0.0, 0.0)]]  # fmt: skip
    diffs = []
    for row in hand_indices(len(shared)):
        pairs = [p for i in row for p in shared[i]]
        diffs.append(sum(t for _, t in pairs) / len(pairs) - sum(b for b, _ in pairs) / len(pairs))
    result = compare(base, tuned)
    assert result == {
        "diff": round(8 / 11 - 4 / 11, 4),
        "ci95": [round(hand_percentile(diffs, 2.5), 4), round(hand_percentile(diffs, 97.5), 4)],
        "n": 6,
        "verdict": "better" if hand_percentile(diffs, 2.5) > 0 else "no detectable difference",
    }
    assert compare(tuned, tuned) == {
        "diff": 0.0,
        "ci95": [0.0, 0.0],
        "n": 7,
        "verdict": "no detectable difference",
    }
    assert compare({"x": [1.0]}, {"y": [1.0]}) is None  # nothing shared
    assert compare({k: base[k] for k in "abcde"}, tuned) is None  # 5 shared: too few for an interval


def test_unpaired_difference_resamples_each_side_on_its_own():
    reference = {"a": [0.0], "b": [1.0], "c": [0.0], "d": [0.0], "e": [1.0], "f": [0.0]}
    candidate = {
        "s": [1.0],
        "t": [1.0],
        "u": [0.0],
        "v": [1.0],
        "w": [1.0],
        "x": [1.0],
        "y": [0.0],
        "z": [1.0],
    }
    ref_rows, cand_rows = list(reference.values()), list(candidate.values())
    diffs = [
        hand_mean(cand_rows, c) - hand_mean(ref_rows, r)
        for r, c in zip(hand_indices(6, SEED), hand_indices(8, SEED + 1), strict=True)
    ]
    result = compare(reference, candidate, paired=False)
    assert result["diff"] == round(6 / 8 - 2 / 6, 4) and result["n"] == 8
    assert result["ci95"] == [round(hand_percentile(diffs, 2.5), 4), round(hand_percentile(diffs, 97.5), 4)]


QUESTIONS = [
    Question(1, "writing", ("Write a haiku.", "Make it sadder.")),
    Question(2, "math", ("What is 6*7?",), reference=("42",)),
    *(Question(k, "roleplay", (f"Play character {k}.",)) for k in range(3, 7)),
    *(Question(f"heldout-x-{k}", "builtin:arithmetic", (f"What is {k}+{k}?",), exact_answer=(str(2 * k),))
      for k in range(30)),
]  # fmt: skip
JUDGED = QUESTIONS[:6]  # 7 turns: 2 + 1 + 4 x 1
TURNS = [("1", 1), ("1", 2), *((str(k), 1) for k in range(2, 7))]


def _answers(model):
    answers = {"1": {"choices": [{"turns": [f"{model} haiku", f"{model} sad haiku"]}]},
               "2": {"choices": [{"turns": [f"{model} says 42"]}]}}  # fmt: skip
    for k in range(3, 7):
        answers[str(k)] = {"choices": [{"turns": [f"{model} plays character {k}"]}]}
    for k in range(30):  # tuned right on 24 of 30, base on 6 of 30
        right = k < 24 if model == "tuned" else k % 5 == 0
        answers[f"heldout-x-{k}"] = {"choices": [{"turns": [str(2 * k if right else 2 * k + 1)]}]}
    return answers


class ScriptedJudge:
    """Answers pairwise chats by a rule on the rendered prompt; counts what it was asked."""

    name = "scripted"

    def __init__(self, rule):
        self.rule, self.calls = rule, 0

    def identity(self):
        return {"backend": "scripted"}

    def complete(self, chats, samples, pairwise=False):
        assert pairwise
        for index, chat in enumerate(chats):
            self.calls += 1
            yield index, [self.rule(chat[1]["content"]) for _ in range(samples)]


def _judge_pairs(tmp_path, rule, name):
    answers = {"base": _answers("base"), "tuned": _answers("tuned")}
    prompts = load_prompts(None, "pairwise")
    judge = ScriptedJudge(rule)
    tasks = build_pair_tasks(JUDGED, answers, prompts, judge.identity(), samples=1)
    assert len(tasks) == 2 * 7  # 7 judged turns, each in both orders
    assert {t.labels["model"] for t in tasks} == {"tuned|base", "base|tuned"}
    records = run_judging(judge, tasks, tmp_path / f"{name}.jsonl", samples=1, pairwise=True, progress=False)
    return answers, records, judge


def test_a_judge_that_always_prefers_the_first_position_finds_only_ties(tmp_path):
    answers, records, _ = _judge_pairs(tmp_path, lambda prompt: "A is better. [[A]]", "first")
    outcomes, failures = pair_outcomes(records)
    assert outcomes == dict.fromkeys(TURNS, 0) and failures == 0
    rows = per_question(QUESTIONS, answers, [], outcomes, judged_questions=JUDGED)
    summary = pairwise_summary(rows, failures)["tuned-base"]
    assert summary["turns"] == 7 and summary["tie_rate"] == 1.0
    assert summary["win_rate"] == summary["loss_rate"] == 0.0
    assert summary["tie_rate_ci95"] == [1.0, 1.0] and summary["win_rate_ci95"] == [0.0, 0.0]
    models = aggregate(QUESTIONS, answers, [], judged_questions=JUDGED)
    assert comparisons(models, rows)["tuned-base"]["pairwise"] == {
        "diff": 0.0, "ci95": [0.0, 0.0], "n": 6, "verdict": "no detectable difference"
    }  # fmt: skip
    # cached and resumable: a rerun asks the judge nothing
    again = ScriptedJudge(lambda prompt: pytest.fail("re-judged"))
    tasks = build_pair_tasks(JUDGED, answers, load_prompts(None, "pairwise"), again.identity(), samples=1)
    rerun = run_judging(again, tasks, tmp_path / "first.jsonl", samples=1, pairwise=True, progress=False)
    assert again.calls == 0 and [r["winner"] for r in rerun] == ["A"] * 14


def test_a_judge_that_prefers_the_tuned_answer_in_both_orders_counts_wins(tmp_path):
    def prefers_tuned(prompt):  # whichever side shows the tuned answer wins; turn 2 of q1 unreadable
        if "sad haiku" in prompt:
            return "no verdict"
        return "[[A]]" if prompt.index("tuned") < prompt.index("base") else "[[B]]"

    answers, records, _ = _judge_pairs(tmp_path, prefers_tuned, "tuned")
    outcomes, failures = pair_outcomes(records)
    assert outcomes == {**dict.fromkeys(TURNS, 1), ("1", 2): None} and failures == 1
    rows = per_question(QUESTIONS, answers, [], outcomes, judged_questions=JUDGED)
    summary = pairwise_summary(rows, failures)["tuned-base"]
    assert (summary["win_rate"], summary["tie_rate"], summary["loss_rate"]) == (1.0, 0.0, 0.0)
    assert summary["turns"] == 6 and summary["failures"] == 1
    found = comparisons(aggregate(QUESTIONS, answers, []), rows)["tuned-base"]["pairwise"]
    assert found == {"diff": 1.0, "ci95": [1.0, 1.0], "n": 6, "verdict": "better"}


def test_results_carry_intervals_and_paired_verdicts():
    answers = {"base": _answers("base"), "tuned": _answers("tuned")}
    scores = {"base": (5, 4, 6, 5, 5, 5, 5), "tuned": (6, 4, 7, 6, 6, 6, 6)}  # per judged turn
    judgments = [
        {"model": m, "question_id": int(q), "turn": t, "category": "x", "score": float(s), "failed": False}
        for m in scores
        for (q, t), s in zip(TURNS, scores[m], strict=True)
    ]
    rows = per_question(QUESTIONS, answers, judgments, judged_questions=JUDGED)
    assert rows[0]["models"]["tuned"] == {"score": [6.0, 4.0], "exact": [None, None], "words": [2, 3]}
    assert rows[6]["models"]["base"]["exact"] == [1.0] and rows[7]["models"]["base"]["exact"] == [0.0]
    models = with_intervals(aggregate(QUESTIONS, answers, judgments, judged_questions=JUDGED), rows)
    tuned = models["tuned"]
    assert list(tuned)[:4] == ["score_overall", "score_overall_ci95", "score_turn1", "score_turn1_ci95"]
    assert tuned["exact_match"] == 0.8
    assert tuned["exact_match_ci95"] == interval(units(rows, "tuned", "exact_match"))
    assert tuned["exact_match_categories_ci95"]["builtin:arithmetic"] == tuned["exact_match_ci95"]
    assert tuned["categories_ci95"]["roleplay"] is None  # 4 questions: too few for an interval
    assert tuned["score_overall_ci95"] == interval(units(rows, "tuned", "score_overall"))
    assert tuned["mean_answer_words"] == round((2 + 3 + 3 + 4 * 4) / 7, 4)  # judged answers only
    found = comparisons(models, rows)["tuned-base"]
    # categories with fewer than 6 questions (and turn 2: one question) get no comparison
    assert list(found) == [
        "score_overall",
        "score_turn1",
        "exact_match",
        "exact_match_categories.builtin:arithmetic",
    ]
    exact = found["exact_match"]
    assert exact["diff"] == pytest.approx(0.8 - 0.2) and exact["n"] == 30 and exact["verdict"] == "better"
    assert exact["ci95"][0] > 0.3
    assert found["score_overall"]["diff"] == round(6 / 7, 4) and found["score_overall"]["n"] == 6
    text = verdict_lines({"tuned-base": found}, None)
    assert "- exact_match: +0.600 [" in text and "], n=30: better" in text
    assert comparisons({"tuned": tuned}, rows) == {}  # nothing to compare without base


def test_plots_draw_the_intervals(tmp_path):
    from pipeline.eval.plots import comparison_chart, radar_chart

    answers = {"base": _answers("base"), "tuned": _answers("tuned")}
    judgments = [
        {
            "model": m,
            "question_id": int(q),
            "turn": t,
            "category": "x",
            "score": 5.0 + (m == "tuned"),
            "failed": False,
        }
        for m in ("base", "tuned")
        for q, t in TURNS
    ]
    rows = per_question(QUESTIONS, answers, judgments, judged_questions=JUDGED)
    models = with_intervals(aggregate(QUESTIONS, answers, judgments, judged_questions=JUDGED), rows)
    found = comparisons(models, rows)["tuned-base"]
    assert {"score_overall", "exact_match"} <= set(found)  # a judge score and a rate: two panels
    for path in (comparison_chart(found, tmp_path / "c.png"), radar_chart(models, tmp_path / "r.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_radar_keeps_tied_models_apart(tmp_path, monkeypatch):
    """Two models with the same scores: both polygons stay visible (style, marker size) and their
    interval bars stand side by side instead of on top of each other."""
    from pipeline.eval import plots

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda plt, figure, path: drawn.append(figure) or path)
    row = {"categories": {"a": 5.0, "b": 6.0, "c": 7.0}, "categories_ci95": {"a": [4.0, 6.0]},
           "score_overall": 6.0}  # fmt: skip
    plots.radar_chart({"base": row, "tuned": dict(row)}, tmp_path / "r.png")
    lines = drawn[0].axes[0].get_lines()
    polygons = [line for line in lines if line.get_label() in ("base — overall 6.00", "tuned — overall 6.00")]
    assert len(polygons) == 2 and list(polygons[0].get_ydata()) == list(polygons[1].get_ydata())
    assert polygons[0].get_linestyle() != polygons[1].get_linestyle()
    assert polygons[0].get_markersize() > polygons[1].get_markersize()  # first drawn: rings the other
    bars = [line for line in lines if list(line.get_ydata()) == [4.0, 6.0]]
    assert len(bars) == 2 and bars[0].get_xdata()[0] != bars[1].get_xdata()[0]
