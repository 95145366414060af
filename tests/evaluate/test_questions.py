"""Question sources: MT-Bench JSONL, the hub dataset's renamed fields, the built-in set, references."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from pipeline.config import EvalConfig
from pipeline.eval import questions as qmod
from pipeline.eval.questions import (
    Question,
    builtin_questions,
    load_questions,
    load_reference_answers,
    question_from_hub_row,
    read_question_file,
    select_questions,
)
from pipeline.stages.base import StageError

CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")


def test_real_mt_bench_file_loads_with_references(shared_data):
    path = shared_data / "mt_bench" / "question.jsonl"
    questions = read_question_file(path)
    assert len(questions) == len(path.read_text().splitlines())  # 80 (full file) or 16 (excerpt)
    per_category = Counter(q.category for q in questions)
    assert set(per_category) == set(CATEGORIES) and len(set(per_category.values())) == 1
    assert all(len(q.turns) == 2 for q in questions)
    by_id = {q.question_id: q for q in questions}
    assert by_id[101].reference == ("You are in second place.", "Uncertain.")
    assert by_id[81].reference is None


def test_reference_file_overrides_question_references(shared_data, tmp_path):
    path = shared_data / "mt_bench" / "question.jsonl"
    config = EvalConfig(
        questions=str(path),
        reference_answers=str(shared_data / "mt_bench" / "reference_answer_gpt-4.jsonl"),
        categories=["math"],
    )
    questions = load_questions(config)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    ids = {cat: [row["question_id"] for row in rows if row["category"] == cat] for cat in CATEGORIES}
    assert [q.question_id for q in questions] == ids["math"]
    refs = load_reference_answers(shared_data / "mt_bench" / "reference_answer_gpt-4.jsonl")
    # FastChat's reference file covers reasoning, math and coding (30 questions in the full file)
    assert set(refs) == {str(qid) for category in ("reasoning", "math", "coding") for qid in ids[category]}
    assert questions[0].reference == refs["111"]
    assert questions[0].reference[0].startswith(refs["111"][0][:20])
    own = next(row["reference"] for row in rows if row["question_id"] == 111)  # "Area is 3", "5pi"
    assert questions[0].reference != tuple(own)  # the reference file wins over the question file


def test_hub_rows_are_mapped_to_fastchat_fields():
    row = {
        "prompt": ["What is 2+2?", "And 3+3?"],
        "prompt_id": 12345678,
        "category": "math",
        "reference": ["4", "6"],
    }
    assert question_from_hub_row(row) == Question(12345678, "math", ("What is 2+2?", "And 3+3?"), ("4", "6"))
    # empty references (the dataset's placeholder for "none") become None
    assert question_from_hub_row({**row, "reference": []}).reference is None
    assert question_from_hub_row({**row, "reference": ["", ""]}).reference is None


def test_hub_source_goes_through_datasets(monkeypatch):
    import datasets

    rows = [
        {"prompt": ["q1a", "q1b"], "prompt_id": 1, "category": "writing", "reference": []},
        {"prompt": ["q2a", "q2b"], "prompt_id": 2, "category": "math", "reference": ["r1", "r2"]},
    ]
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    questions = load_questions(EvalConfig(questions="hub"))
    assert calls == [("HuggingFaceH4/mt_bench_prompts", "train")]
    assert [(q.question_id, q.category, q.reference) for q in questions] == [
        (1, "writing", None),
        (2, "math", ("r1", "r2")),
    ]


def test_builtin_set_has_every_category_and_verifiable_tasks():
    questions = builtin_questions(3)
    assert {q.category for q in questions} >= {
        "writing",
        "roleplay",
        "reasoning",
        "math",
        "coding",
        "extraction",
        "stem",
        "humanities",
    }
    verifiable = [q for q in questions if q.exact_answer]
    assert len(verifiable) == 3
    for q in verifiable:
        assert q.turns[1] == qmod.FINAL_ANSWER_TURN
        assert q.exact_answer[0] == q.exact_answer[1] == q.reference[1]
    # deterministic: the same questions every run, so runs are comparable
    assert builtin_questions(3) == questions
    # every reference-graded built-in question carries a reference
    assert all(q.reference for q in questions if q.category in ("math", "reasoning", "coding"))


def test_builtin_generated_tasks_skip_training_instructions():
    first = builtin_questions(2)
    trained_on = [first[-2].turns[0]]
    again = builtin_questions(2, exclude_instructions=trained_on)
    assert len([q for q in again if q.exact_answer]) == 2
    assert trained_on[0] not in {q.turns[0] for q in again}


def test_bad_question_file_names_file_and_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(
        json.dumps({"question_id": 1, "category": "math", "turns": ["a", "b"]})
        + "\n"
        + json.dumps({"question_id": 2, "turns": ["a"]})
        + "\n"
    )
    with pytest.raises(StageError, match=r"q\.jsonl:2: missing field 'category'"):
        read_question_file(path)
    path.write_text('{"question_id": 1, "category": "math", "turns": ["a"]}\n{not json\n')
    with pytest.raises(StageError, match=r"q\.jsonl:2: invalid JSON"):
        read_question_file(path)
    path.write_text('{"question_id": 1, "category": "math", "turns": ["a"]}\n' * 2)
    with pytest.raises(StageError, match="duplicate question_id 1"):
        read_question_file(path)
    with pytest.raises(StageError, match=r"eval\.questions: file not found"):
        read_question_file(tmp_path / "missing.jsonl")


def test_selection():
    qs = [Question(i, cat, ("t",)) for i, cat in enumerate(["math", "math", "writing"])]
    assert [q.question_id for q in select_questions(qs, categories=["math"])] == [0, 1]
    assert [q.question_id for q in select_questions(qs, question_ids=["2"])] == [2]
    assert [q.question_id for q in select_questions(qs, max_questions=1)] == [0]
    with pytest.raises(StageError, match=r"eval\.categories: unknown \['poetry'\]"):
        select_questions(qs, categories=["poetry"])


def test_task_category_map_covers_exactly_the_builtin_categories():
    """Every generated task kind has its judging category (none falls through to the default) and
    the map names no kind the generator never produces."""
    from pipeline.builtin_tasks import CATEGORIES

    assert set(qmod.TASK_CATEGORY_MAP) == set(CATEGORIES)
