"""Evaluation questions: FastChat's ``question.jsonl`` records plus an optional per-turn ``exact_answer`` a
string match checks; every source (built-in, JSONL, hub, the prepared eval split) becomes a ``Question``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.builtin_tasks import generate_tasks
from pipeline.errors import StageError
from pipeline.jsonl import read_jsonl

if TYPE_CHECKING:
    from pipeline.config import EvalConfig

BUILTIN_FILE = Path(__file__).resolve().parents[1] / "builtin" / "mt_bench_questions.jsonl"
BUILTIN_TASK_SEED = 20_251  # fixed, not the run seed: every run scores the same questions, runs compare
BUILTIN_TASK_ID_OFFSET = 1_000
FINAL_ANSWER_TURN = "Now reply with only the final answer, nothing else."

# Built-in generated task kinds -> the MT-Bench category whose judging rules fit them.
TASK_CATEGORY_MAP = {"arithmetic": "math", "unit_conversion": "math", "date": "math", "string": "reasoning",
                     "list": "reasoning", "json": "extraction"}  # fmt: skip


@dataclass(frozen=True)
class Question:
    """One multi-turn MT-Bench question."""

    question_id: int | str
    category: str
    turns: tuple[str, ...]
    reference: tuple[str, ...] | None = None
    exact_answer: tuple[str | None, ...] | None = None


def _question_from_record(record: Any, where: str) -> Question:
    """Validate one FastChat question record; ``where`` names the file and line for errors."""
    if not isinstance(record, dict):
        raise StageError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if missing := [key for key in ("question_id", "category", "turns") if key not in record]:
        raise StageError(f"{where}: missing field '{missing[0]}'")
    turns = record["turns"]
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise StageError(f"{where}: 'turns' must be a non-empty list of non-empty strings")
    if len(turns) > 2:
        raise StageError(f"{where}: {len(turns)} turns; MT-Bench grading covers one or two turns")
    if not isinstance(record["category"], str) or not record["category"]:
        raise StageError(f"{where}: 'category' must be a non-empty string")
    reference, exact = (_turn_list(record.get(name), where, name) for name in ("reference", "exact_answer"))
    return Question(record["question_id"], record["category"], tuple(turns), reference, exact)


def _turn_list(value: Any, where: str, name: str) -> tuple[Any, ...] | None:
    """A ``reference`` (strings; all blank, the hub's "no reference": None) or an ``exact_answer``."""
    nullable = name == "exact_answer"
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) or (nullable and v is None) for v in value):
        raise StageError(f"{where}: '{name}' must be a list of strings")
    return tuple(value) if nullable or any(v.strip() for v in value) else None


def _check_unique(questions: list[Question], source: str) -> list[Question]:
    seen: set[str] = set()
    for q in questions:
        if str(q.question_id) in seen:
            raise StageError(f"{source}: duplicate question_id {q.question_id!r}")
        seen.add(str(q.question_id))
    return questions


def read_question_file(path: Path) -> list[Question]:
    """Questions from an MT-Bench ``question.jsonl``."""
    rows = read_jsonl(path, "eval.questions")
    return _check_unique([_question_from_record(record, where) for where, record in rows], str(path))


def question_from_hub_row(row: dict[str, Any]) -> Question:
    """A ``HuggingFaceH4/mt_bench_prompts`` row in FastChat fields: its ``prompt`` is ``turns``, ``prompt_id``
    hashes the turns (FastChat's references keyed 81..160 do not match it; its ``reference`` is used)."""
    record = {"question_id": row.get("question_id", row.get("prompt_id")), "category": row.get("category"),
              "turns": row.get("turns", row.get("prompt")), "reference": row.get("reference") or None}
    return _question_from_record(record, f"hub row {record['question_id']}")


def builtin_questions(n_verifiable: int, exclude_instructions: Iterable[str] = ()) -> list[Question]:
    """The offline set: hand-written MT-Bench-style questions plus ``n_verifiable`` generated tasks with exact
    answers, minus any whose instruction is in ``exclude_instructions`` (training split): a clean score."""
    excluded = {text.strip() for text in exclude_instructions}
    # Over-generate so that decontamination still leaves n_verifiable tasks.
    tasks = generate_tasks(n_verifiable * 4 + 8, BUILTIN_TASK_SEED)
    kept = [task for task in tasks if task["instruction"].strip() not in excluded][:n_verifiable]
    questions = read_question_file(BUILTIN_FILE)
    for index, task in enumerate(kept, start=BUILTIN_TASK_ID_OFFSET + 1):
        answer, turns = str(task["answer"]), (task["instruction"], FINAL_ANSWER_TURN)
        category = TASK_CATEGORY_MAP[task["category"]]
        questions.append(Question(index, category, turns, (task["output"], answer), (answer, answer)))
    return questions


def load_reference_answers(path: Path) -> dict[str, tuple[str, ...]]:
    """FastChat reference answers (``question_id``, ``choices[0].turns``), keyed by ``str(id)``."""
    references: dict[str, tuple[str, ...]] = {}
    for where, record in read_jsonl(path, "eval.reference_answers"):
        try:
            turns, qid = record["choices"][0]["turns"], record["question_id"]
        except (KeyError, IndexError, TypeError):
            raise StageError(f"{where}: expected 'question_id' and 'choices[0].turns'") from None
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise StageError(f"{where}: 'choices[0].turns' must be a list of strings")
        references[str(qid)] = tuple(turns)
    return references


def select_questions(questions: list[Question], categories: list[str] | None = None,
                     question_ids: list[int | str] | None = None, max_questions: int | None = None,
                     ) -> list[Question]:  # fmt: skip
    """The configured subset, in source order; an empty result is an error, not a silent no-op."""
    selected = questions
    if categories:
        known = {q.category for q in questions}
        if unknown := sorted(set(categories) - known):
            raise StageError(f"eval.categories: unknown {unknown}; the questions have {sorted(known)}")
        selected = [q for q in selected if q.category in set(categories)]
    if question_ids:
        wanted = {str(i) for i in question_ids}
        if missing := sorted(wanted - {str(q.question_id) for q in selected}):
            raise StageError(f"eval.question_ids: not among the selected questions: {missing}")
        selected = [q for q in selected if str(q.question_id) in wanted]
    if not (selected := selected[:max_questions]):
        raise StageError("eval: no questions left after applying categories/question_ids/max_questions")
    return selected


def load_questions(config: EvalConfig, exclude_instructions: Iterable[str] = ()) -> list[Question]:
    """The ``eval`` section's questions; a reference-answer file replaces their own ``reference``."""
    if config.questions == "builtin":
        questions = builtin_questions(config.builtin_verifiable, exclude_instructions)
    elif config.questions == "hub":  # in either FastChat or HuggingFaceH4 field names
        import datasets

        dataset, split = config.hub_dataset, config.hub_split
        try:
            rows = datasets.load_dataset(dataset, split=split)
        except Exception as error:  # network, missing split, offline mode: one clear line
            raise StageError(f"eval.hub_dataset: cannot load {dataset!r} split {split!r}: {error}") from None
        questions = _check_unique([question_from_hub_row(dict(row)) for row in rows], dataset)
    else:
        questions = read_question_file(Path(config.questions))
    if config.reference_answers:
        refs = load_reference_answers(Path(config.reference_answers))
        questions = [replace(q, reference=refs.get(str(q.question_id), q.reference)) for q in questions]
    return select_questions(questions, config.categories, config.question_ids, config.max_questions)


def is_verifiable(question: Question) -> bool:
    """Every turn has an expected answer: exact match alone scores it (no judge needed)."""
    answers = question.exact_answer or ()
    return len(answers) >= len(question.turns) and all(a is not None for a in answers[: len(question.turns)])


def load_heldout_questions(dataset_dir: Path, limit: int, sources: list[str] | None = None) -> list[Question]:
    """Up to ``limit`` eval-split rows with an ``answer`` and one user turn, as questions in split order;
    ``k`` in ``heldout-<source>-<k>`` counts a source's eligible rows: ids survive other limits/sources."""
    if limit <= 0:
        return []
    if not dataset_dir.is_dir():
        raise StageError(f"eval.heldout_questions: no prepared dataset at {dataset_dir} (run the 'prepare' "
                         "stage first)")  # fmt: skip
    from datasets import load_from_disk

    split = load_from_disk(str(dataset_dir))["eval"]  # prepare's schema: messages, source, answer
    known = sorted({str(s) for s in split["source"]})
    if unknown := sorted(set(sources or ()) - set(known)):
        raise StageError(f"eval.heldout_sources: unknown {unknown}; the eval split has sources {known}")
    wanted = set(sources or known)
    questions: list[Question] = []
    for row in split.select_columns(["messages", "source", "answer"]):
        source, messages = str(row["source"]), row["messages"] or []
        answer = "" if row["answer"] is None else str(row["answer"]).strip()
        users = [m["content"] for m in messages if m.get("role") == "user"]
        if source not in wanted or not answer or len(users) != 1 or not str(users[0]).strip():
            continue
        # No system message: asked exactly like an MT-Bench question (the answer cache keys on turns).
        replies = tuple(str(m["content"]) for m in messages if m.get("role") == "assistant")
        qid = f"heldout-{source}-{sum(q.category == source for q in questions)}"
        questions.append(Question(qid, source, (str(users[0]),), replies[:1] or None, (answer,)))
        if len(questions) == limit:
            break
    if not questions:
        raise StageError(f"eval.heldout_questions: no row of the eval split in {dataset_dir} (sources "
                         f"{sorted(wanted)}) has an 'answer' and exactly one user turn")  # fmt: skip
    return questions
