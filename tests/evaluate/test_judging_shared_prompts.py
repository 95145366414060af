"""Two models that answer alike produce the same judge prompt: it is judged once, and each model
still gets its own, correctly labelled judgment (the report's base row must not lose categories)."""

from __future__ import annotations

from pipeline.eval.aggregate import aggregate
from pipeline.eval.judging import build_tasks, run_judging
from pipeline.eval.prompts import BUILTIN_PROMPTS
from pipeline.eval.questions import Question


class ScriptedJudge:
    """Rates every chat by a fixed rule and records what it was asked."""

    name = "scripted"

    def __init__(self):
        self.asked: list[str] = []

    def identity(self):
        return {"backend": "scripted"}

    def complete(self, chats, samples, pairwise=False):
        for index, chat in enumerate(chats):
            self.asked.append(chat[-1]["content"])
            yield index, ["Rating: [[7]]" if "good" in chat[-1]["content"] else "Rating: [[2]]"]


def test_identical_answers_are_judged_once_and_reported_for_each_model(tmp_path):
    questions = [Question(1, "writing", ("q1a", "q1b")), Question(2, "stem", ("q2a", "q2b"))]
    same = {"1": {"choices": [{"turns": ["good one", "good two"]}]}}
    answers = {
        "base": {**same, "2": {"choices": [{"turns": ["meh", "meh again"]}]}},
        "tuned": {**same, "2": {"choices": [{"turns": ["good", "good again"]}]}},
    }
    judge = ScriptedJudge()
    tasks = build_tasks(questions, answers, BUILTIN_PROMPTS, judge.identity(), samples=1)
    records = run_judging(judge, tasks, tmp_path / "judgments.jsonl", progress=False)

    assert len(judge.asked) == 6  # 8 turns, 2 of them (question 1, both turns) shared by the models
    assert [(r["model"], r["question_id"], r["turn"], r["score"]) for r in records] == [
        ("base", 1, 1, 7.0), ("base", 1, 2, 7.0), ("base", 2, 1, 2.0), ("base", 2, 2, 2.0),
        ("tuned", 1, 1, 7.0), ("tuned", 1, 2, 7.0), ("tuned", 2, 1, 7.0), ("tuned", 2, 2, 7.0),
    ]  # fmt: skip
    report = aggregate(questions, answers, records)
    assert report["base"]["categories"] == {"stem": 2.0, "writing": 7.0}
    assert report["tuned"]["categories"] == {"stem": 7.0, "writing": 7.0}
    assert report["base"]["judged"] == report["tuned"]["judged"] == 4

    again = ScriptedJudge()  # a rerun reads everything from the cache, labels intact
    assert run_judging(again, tasks, tmp_path / "judgments.jsonl", progress=False) == records
    assert again.asked == []
