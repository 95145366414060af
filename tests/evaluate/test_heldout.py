"""Held-out questions from the prepared eval split: how rows become questions, source filtering and
its errors, greedy decoding for them, and ``judge_verifiable: false`` keeping them from the judge
(the stage run with fake answers and a scripted judge: no model, fast)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from pipeline.config import PipelineConfig, format_validation_error
from pipeline.eval.questions import Question, is_verifiable, load_heldout_questions
from pipeline.stages import evaluate
from pipeline.stages.base import StageContext, StageError


def _chat(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in pairs]


EVAL_ROWS = [
    {
        "messages": _chat(
            ("system", "Be brief."), ("user", "Natalia sold 48 clips..."), ("assistant", "48+24 = 72")
        ),
        "source": "gsm8k",
        "answer": "72",
    },
    {"messages": _chat(("user", "Say hi."), ("assistant", "Hi!")), "source": "chat", "answer": None},
    {  # two user turns: no single checkable answer, skipped (and not counted in k)
        "messages": _chat(("user", "2+3?"), ("assistant", "5"), ("user", "Times 2?"), ("assistant", "10")),
        "source": "gsm8k",
        "answer": "10",
    },
    {
        "messages": _chat(("user", "Weng earns $12 an hour..."), ("assistant", "So $10.")),
        "source": "gsm8k",
        "answer": "10",
    },
    {"messages": _chat(("user", "Tell a joke."), ("assistant", "No.")), "source": "chat", "answer": ""},
    {
        "messages": _chat(("user", "Betty has 3 apples..."), ("assistant", "3")),
        "source": "gsm8k",
        "answer": "3",
    },
]
TRAIN_ROWS = [
    {"messages": _chat(("user", "Train me."), ("assistant", "OK.")), "source": "gsm8k", "answer": "1"}
]
HELDOUT = [
    Question("heldout-gsm8k-0", "gsm8k", ("Natalia sold 48 clips...",), ("48+24 = 72",), ("72",)),
    Question("heldout-gsm8k-1", "gsm8k", ("Weng earns $12 an hour...",), ("So $10.",), ("10",)),
    Question("heldout-gsm8k-2", "gsm8k", ("Betty has 3 apples...",), ("3",), ("3",)),
]


def write_prepared(dataset_dir, eval_rows=EVAL_ROWS):
    import datasets

    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(TRAIN_ROWS), "eval": datasets.Dataset.from_list(eval_rows)}
    ).save_to_disk(str(dataset_dir))
    return dataset_dir


@pytest.fixture
def prepared(tmp_path):
    return write_prepared(tmp_path / "prepare" / "dataset")


def test_rows_with_an_answer_and_one_user_turn_become_one_turn_questions(prepared):
    assert load_heldout_questions(prepared, 10) == HELDOUT
    assert load_heldout_questions(prepared, 2) == HELDOUT[:2]  # the first eligible rows, in order
    assert load_heldout_questions(prepared, 10, ["gsm8k"]) == HELDOUT
    assert all(is_verifiable(q) for q in HELDOUT)
    assert load_heldout_questions(prepared / "absent", 0) == []  # off: the dataset is not read


def test_running_index_is_per_source(tmp_path):
    rows = [{**EVAL_ROWS[0]}, {**EVAL_ROWS[5], "source": "arith"}, {**EVAL_ROWS[3]}]
    dataset = write_prepared(tmp_path / "ds", rows)
    assert [q.question_id for q in load_heldout_questions(dataset, 5)] == [
        "heldout-gsm8k-0",
        "heldout-arith-0",
        "heldout-gsm8k-1",
    ]
    only = load_heldout_questions(dataset, 5, ["arith"])
    assert [(q.question_id, q.category) for q in only] == [("heldout-arith-0", "arith")]


def test_source_errors_and_missing_inputs(prepared, tmp_path):
    with pytest.raises(StageError) as error:
        load_heldout_questions(prepared, 3, ["gsm8k", "mmlu"])
    assert (
        str(error.value)
        == "eval.heldout_sources: unknown ['mmlu']; the eval split has sources ['chat', 'gsm8k']"
    )
    no_row = (
        r"^eval\.heldout_questions: no row of the eval split in .* \(sources \['chat'\]\) has an 'answer'"
    )
    with pytest.raises(StageError, match=no_row + " and exactly one user turn$"):
        load_heldout_questions(prepared, 3, ["chat"])
    with pytest.raises(
        StageError, match=r"^eval\.heldout_questions: no prepared dataset at .*absent \(run the "
    ):
        load_heldout_questions(tmp_path / "absent", 3)


def test_sources_without_a_count_is_a_config_error():
    with pytest.raises(ValidationError) as error:
        PipelineConfig.model_validate(
            {"run": {"name": "x"}, "model": {"name_or_path": "gpt2"}, "eval": {"heldout_sources": ["gsm8k"]}}
        )
    assert format_validation_error(error.value) == [
        "eval.heldout_sources: has no effect unless heldout_questions > 0 (got ['gsm8k'])"
    ]


# --------------------------------------------------------------------------------------------
# the stage, with fake answers and a scripted judge
# --------------------------------------------------------------------------------------------
FILE_QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a line about rain.", "Shorter."]},
    {"question_id": 2, "category": "math", "turns": ["2+2?", "Only the number."], "exact_answer": ["4", "4"]},
]
FAKE_TURNS = {  # what the fake model answers, by the question's first turn
    "Write a line about rain.": ["Rain taps.", "Rain."],
    "2+2?": ["It is 4.", "5"],
    "Natalia sold 48 clips...": ["She sold 72 clips in total."],
    "Weng earns $12 an hour...": ["She earned $10.00."],
    "Betty has 3 apples...": ["3 then 4"],
}


class RecordingJudge:
    """Rates every chat 6 and records the user prompts it was given."""

    name = "recording"

    def __init__(self):
        self.asked: list[str] = []

    def identity(self):
        return {"backend": "recording"}

    def complete(self, chats, samples, pairwise=False):
        for index, chat in enumerate(chats):
            self.asked.append(chat[-1]["content"])
            yield index, ["Rating: [[6]]"]


def _stage(tmp_path, monkeypatch, judge, questions=FILE_QUESTIONS, **eval_overrides):
    questions_file = tmp_path / "question.jsonl"
    questions_file.write_text("".join(json.dumps(q) + "\n" for q in questions))
    config = PipelineConfig.model_validate(
        {
            "run": {"name": "h", "output_dir": str(tmp_path / "runs")},
            "model": {"name_or_path": "gpt2"},
            "eval": {"questions": str(questions_file), "models": ["base"], "judge": {"backend": "local"},
                     "heldout_questions": 5, **eval_overrides},
        }
    )  # fmt: skip
    run_dir = config.run_dir
    write_prepared(run_dir / "prepare" / "dataset")
    asked: dict[str, object] = {}

    def fake_generate_all(config, questions, answers_dir, tuned_path, greedy=()):
        asked["ids"] = [q.question_id for q in questions]
        asked["settings"] = evaluate.generation_settings(config, greedy)
        return {
            "base": {str(q.question_id): {"choices": [{"turns": FAKE_TURNS[q.turns[0]]}]} for q in questions}
        }

    monkeypatch.setattr(evaluate, "generate_all", fake_generate_all)
    monkeypatch.setattr("pipeline.judges.LocalJudge.from_config", lambda *args, **kwargs: judge)
    ctx = StageContext(config=config, run_dir=run_dir, work_dir=run_dir / "evaluate.partial")
    result = evaluate.run(ctx)
    return result, json.loads((ctx.work_dir / "results.json").read_text()), asked


def test_unjudged_verifiable_questions_count_only_in_exact_match(tmp_path, monkeypatch):
    judge = RecordingJudge()
    result, results, asked = _stage(tmp_path, monkeypatch, judge, judge_verifiable=False)
    # eval.questions first, then the held-out rows; the selection of eval.questions does not cut them
    assert asked["ids"] == [1, 2, "heldout-gsm8k-0", "heldout-gsm8k-1", "heldout-gsm8k-2"]
    assert asked["settings"].temperature("gsm8k") == 0.0  # greedy: no sampling luck in accuracy
    assert asked["settings"].temperature("writing") == 0.7
    # only the writing question (2 turns) reached the judge
    assert len(judge.asked) == 2 and all("rain" in text for text in judge.asked)
    row = results["models"]["base"]
    assert row["categories"] == {"writing": 6.0} and row["score_overall"] == 6.0 and row["judged"] == 2
    # math: "It is 4." yes, "5" no; gsm8k: "72 clips" and "$10.00" yes, "3 then 4" no
    assert row["exact_match_categories"] == {"gsm8k": pytest.approx(2 / 3, abs=1e-4), "math": 0.5}
    assert row["exact_match"] == pytest.approx(0.6)
    assert results["questions"] | {"source": None} == {
        "source": None,
        "count": 5,
        "categories": ["gsm8k", "math", "writing"],
        "heldout": 3,
        "heldout_sources": ["gsm8k"],
        "judged": 1,
    }
    assert result.metrics["base.exact_match.gsm8k"] == pytest.approx(0.6667)
    assert result.metrics["base.exact_match.math"] == 0.5
    assert "base.category.gsm8k" not in result.metrics
    assert set(result.outputs) == {"results", "table", "radar", "judgments", "per_question"}


def test_judge_verifiable_true_sends_every_question(tmp_path, monkeypatch):
    judge = RecordingJudge()
    _, results, _ = _stage(tmp_path, monkeypatch, judge, heldout_sources=["gsm8k"])
    assert len(judge.asked) == 2 + 2 + 3  # writing and math (2 turns each) and 3 held-out
    assert sum("Natalia" in text for text in judge.asked) == 1
    row = results["models"]["base"]
    assert row["categories"] == {"gsm8k": 6.0, "math": 6.0, "writing": 6.0}
    assert results["questions"]["judged"] == 5


def test_nothing_left_to_judge_gives_null_scores_and_no_judge(tmp_path, monkeypatch):
    class NoJudge:
        def __getattr__(self, name):
            raise AssertionError("the judge was used")

    result, results, _ = _stage(
        tmp_path, monkeypatch, NoJudge(), questions=FILE_QUESTIONS[1:], judge_verifiable=False
    )
    row = results["models"]["base"]
    assert row["score_overall"] is None and row["categories"] == {} and row["judged"] == 0
    assert row["exact_match"] == pytest.approx(0.6)
    assert set(result.outputs) == {"results", "table", "per_question"}  # no radar, no judgments
    assert "base.score_overall" not in result.metrics and result.metrics["base.exact_match"] == 0.6


def test_missing_prepared_dataset_fails_before_generation(tmp_path, monkeypatch):
    questions_file = tmp_path / "question.jsonl"
    questions_file.write_text(json.dumps(FILE_QUESTIONS[0]) + "\n")
    config = PipelineConfig.model_validate(
        {
            "run": {"name": "h", "output_dir": str(tmp_path / "runs")},
            "model": {"name_or_path": "gpt2"},
            "eval": {"questions": str(questions_file), "models": ["base"], "heldout_questions": 2},
        }
    )
    monkeypatch.setattr(evaluate, "generate_all", lambda *a, **k: pytest.fail("generation started"))
    ctx = StageContext(config=config, run_dir=config.run_dir, work_dir=tmp_path / "w")
    with pytest.raises(
        StageError, match=r"^eval\.heldout_questions: no prepared dataset at .*prepare/dataset"
    ):
        evaluate.run(ctx)


def test_heldout_categories_are_greedy_unless_configured():
    def settings(**eval_section):
        config = PipelineConfig.model_validate(
            {"run": {"name": "x"}, "model": {"name_or_path": "gpt2"}, "eval": eval_section}
        )
        return evaluate.generation_settings(config, HELDOUT)

    assert settings().temperature("gsm8k") == 0.0
    assert settings(default_temperature=0.5).temperature("other") == 0.5
    assert settings(temperatures={"gsm8k": 0.3}).temperature("gsm8k") == 0.3
    plain = evaluate.generation_settings(
        PipelineConfig.model_validate({"run": {"name": "x"}, "model": {"name_or_path": "gpt2"}})
    )
    assert plain.temperature("gsm8k") == 0.7  # not a held-out category: the default temperature
