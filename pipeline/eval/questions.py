"""Evaluation questions in MT-Bench's format, from the built-in set, a local JSONL or the hub.

A question is FastChat's ``question.jsonl`` record: ``question_id``, ``category``, ``turns`` (the
user messages, asked one after the other in one conversation) and an optional ``reference`` (the
reference answers a judge compares against for math/reasoning/coding). We add one optional field,
``exact_answer`` (per turn, or null), for questions whose answer can be checked by string match.

Sources differ only in field names, so everything is normalised to :class:`Question` here and the
rest of the stage never sees where a question came from.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import StageError
from pipeline.jsonl import read_jsonl

if TYPE_CHECKING:
    from pipeline.config import EvalConfig

BUILTIN_FILE = Path(__file__).resolve().parents[1] / "builtin" / "mt_bench_questions.jsonl"
# Fixed, not the run seed: every run is scored on the same questions, so runs stay comparable.
BUILTIN_TASK_SEED = 20_251
BUILTIN_TASK_ID_OFFSET = 1_000
FINAL_ANSWER_TURN = "Now reply with only the final answer, nothing else."

# Built-in generated task kinds -> the MT-Bench category whose judging rules fit them.
TASK_CATEGORY_MAP = {
    "arithmetic": "math",
    "unit_conversion": "math",
    "date": "math",
    "string": "reasoning",
    "list": "reasoning",
    "json": "extraction",
}


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
    for key in ("question_id", "category", "turns"):
        if key not in record:
            raise StageError(f"{where}: missing field '{key}'")
    turns = record["turns"]
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise StageError(f"{where}: 'turns' must be a non-empty list of non-empty strings")
    if len(turns) > 2:
        raise StageError(f"{where}: {len(turns)} turns; MT-Bench grading covers one or two turns")
    if not isinstance(record["category"], str) or not record["category"]:
        raise StageError(f"{where}: 'category' must be a non-empty string")
    return Question(
        question_id=record["question_id"],
        category=record["category"],
        turns=tuple(turns),
        reference=_optional_turn_list(record.get("reference"), where, "reference"),
        exact_answer=_optional_turn_list(record.get("exact_answer"), where, "exact_answer", nullable=True),
    )


def _optional_turn_list(
    value: Any, where: str, name: str, *, nullable: bool = False
) -> tuple[Any, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) or (nullable and v is None) for v in value):
        raise StageError(f"{where}: '{name}' must be a list of strings")
    if not nullable and not any(v.strip() for v in value):
        return None  # the hub dataset stores [] or ["", ""] for "no reference"
    return tuple(value)


def read_question_file(path: Path) -> list[Question]:
    """Questions from an MT-Bench ``question.jsonl``."""
    questions = [_question_from_record(record, where) for where, record in read_jsonl(path, "eval.questions")]
    _check_unique(questions, str(path))
    return questions


def question_from_hub_row(row: dict[str, Any]) -> Question:
    """Map a ``HuggingFaceH4/mt_bench_prompts`` row to FastChat's fields.

    That dataset renamed ``turns`` to ``prompt``, replaced ``question_id`` by ``prompt_id`` (a hash
    of the turns, so FastChat reference files keyed by 81..160 do not match it; its own
    ``reference`` column is used instead) and stores empty references as ``[]``.
    """
    record = {
        "question_id": row.get("question_id", row.get("prompt_id")),
        "category": row.get("category"),
        "turns": row.get("turns", row.get("prompt")),
        "reference": row.get("reference") or None,
    }
    return _question_from_record(record, f"hub row {record['question_id']}")


def load_hub_questions(dataset: str, split: str) -> list[Question]:
    """Questions from a hub dataset in either FastChat or HuggingFaceH4 field names."""
    import datasets

    try:
        rows = datasets.load_dataset(dataset, split=split)
    except Exception as error:  # network, missing split, offline mode: one clear line
        raise StageError(f"eval.hub_dataset: cannot load {dataset!r} split {split!r}: {error}") from None
    questions = [question_from_hub_row(dict(row)) for row in rows]
    _check_unique(questions, dataset)
    return questions


def _generated_tasks(n: int, seed: int) -> list[dict[str, Any]]:
    """Verifiable tasks from the project's task generator (the one prepare can train on)."""
    from pipeline.builtin_tasks import generate_tasks

    return generate_tasks(n, seed)


def builtin_questions(n_verifiable: int, exclude_instructions: Iterable[str] = ()) -> list[Question]:
    """The project's offline question set: hand-written MT-Bench-style questions (one or more per
    category) plus ``n_verifiable`` generated tasks with exact-match answers.

    Generated tasks whose instruction occurs in ``exclude_instructions`` (the training split) are
    skipped, so a tuned model is never scored on a question it was trained on.
    """
    questions = read_question_file(BUILTIN_FILE)
    if n_verifiable <= 0:
        return questions
    excluded = {text.strip() for text in exclude_instructions}
    kept: list[dict[str, Any]] = []
    # Over-generate so that decontamination still leaves n_verifiable tasks.
    for task in _generated_tasks(n_verifiable * 4 + 8, BUILTIN_TASK_SEED):
        if task["instruction"].strip() not in excluded:
            kept.append(task)
        if len(kept) == n_verifiable:
            break
    for index, task in enumerate(kept):
        answer = str(task["answer"])
        questions.append(
            Question(
                question_id=BUILTIN_TASK_ID_OFFSET + index + 1,
                category=TASK_CATEGORY_MAP.get(task["category"], "reasoning"),
                turns=(task["instruction"], FINAL_ANSWER_TURN),
                reference=(task["output"], answer),
                exact_answer=(answer, answer),
            )
        )
    return questions


def load_reference_answers(path: Path) -> dict[str, tuple[str, ...]]:
    """FastChat reference answers (``question_id``, ``choices[0].turns``), keyed by ``str(id)``."""
    references: dict[str, tuple[str, ...]] = {}
    for where, record in read_jsonl(path, "eval.reference_answers"):
        try:
            turns = record["choices"][0]["turns"]
            qid = record["question_id"]
        except (KeyError, IndexError, TypeError):
            raise StageError(f"{where}: expected 'question_id' and 'choices[0].turns'") from None
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise StageError(f"{where}: 'choices[0].turns' must be a list of strings")
        references[str(qid)] = tuple(turns)
    return references


def with_references(questions: list[Question], references: dict[str, tuple[str, ...]]) -> list[Question]:
    """Questions with the reference file's answers in place of their own ``reference`` field."""
    from dataclasses import replace

    return [
        replace(q, reference=references[str(q.question_id)]) if str(q.question_id) in references else q
        for q in questions
    ]


def select_questions(
    questions: list[Question],
    categories: list[str] | None = None,
    question_ids: list[int | str] | None = None,
    max_questions: int | None = None,
) -> list[Question]:
    """The configured subset, in source order; an empty result is an error, not a silent no-op."""
    selected = questions
    if categories:
        known = {q.category for q in questions}
        unknown = sorted(set(categories) - known)
        if unknown:
            raise StageError(f"eval.categories: unknown {unknown}; the questions have {sorted(known)}")
        selected = [q for q in selected if q.category in set(categories)]
    if question_ids:
        wanted = {str(i) for i in question_ids}
        missing = sorted(wanted - {str(q.question_id) for q in selected})
        if missing:
            raise StageError(f"eval.question_ids: not among the selected questions: {missing}")
        selected = [q for q in selected if str(q.question_id) in wanted]
    if max_questions is not None:
        selected = selected[:max_questions]
    if not selected:
        raise StageError("eval: no questions left after applying categories/question_ids/max_questions")
    return selected


def load_questions(config: EvalConfig, exclude_instructions: Iterable[str] = ()) -> list[Question]:
    """Every question the evaluate stage asks, per the ``eval`` config section."""
    if config.questions == "builtin":
        questions = builtin_questions(config.builtin_verifiable, exclude_instructions)
    elif config.questions == "hub":
        questions = load_hub_questions(config.hub_dataset, config.hub_split)
    else:
        questions = read_question_file(Path(config.questions))
    if config.reference_answers:
        questions = with_references(questions, load_reference_answers(Path(config.reference_answers)))
    return select_questions(questions, config.categories, config.question_ids, config.max_questions)


def _check_unique(questions: list[Question], source: str) -> None:
    seen: set[str] = set()
    for q in questions:
        if str(q.question_id) in seen:
            raise StageError(f"{source}: duplicate question_id {q.question_id!r}")
        seen.add(str(q.question_id))


# --------------------------------------------------------------------------------------------
# held-out questions from the prepared eval split
# --------------------------------------------------------------------------------------------
HELDOUT_PREFIX = "heldout"
HELDOUT_COLUMNS = ("messages", "source", "answer")


def is_verifiable(question: Question) -> bool:
    """Every turn has an expected answer: exact match alone scores it (no judge needed)."""
    answers = question.exact_answer or ()
    return len(answers) >= len(question.turns) and all(a is not None for a in answers[: len(question.turns)])


def heldout_question(row: dict[str, Any], k: int) -> Question | None:
    """One prepared eval row as a one-turn question, or None when it is not eligible.

    Eligible: a non-empty ``answer`` and exactly one user turn (multi-turn rows have no single
    checkable answer). A system message is left out on purpose: MT-Bench questions have no system
    turn, generation asks only user turns, and the answer cache keys on the turns alone, so a
    held-out question is asked exactly like every other question.
    """
    answer = row.get("answer")
    answer = "" if answer is None else str(answer).strip()
    messages = row.get("messages") or []
    users = [m["content"] for m in messages if m.get("role") == "user"]
    if not answer or len(users) != 1 or not str(users[0]).strip():
        return None
    replies = [m["content"] for m in messages if m.get("role") == "assistant"]
    source = str(row["source"])
    return Question(
        question_id=f"{HELDOUT_PREFIX}-{source}-{k}",
        category=source,
        turns=(str(users[0]),),
        reference=(str(replies[0]),) if replies else None,
        exact_answer=(answer,),
    )


def load_heldout_questions(dataset_dir: Path, limit: int, sources: list[str] | None = None) -> list[Question]:
    """Up to ``limit`` eligible rows of the prepared dataset's ``eval`` split, in split order.

    ``k`` in ``heldout-<source>-<k>`` counts a source's eligible rows from 0, so a row keeps its id
    when ``limit`` or ``sources`` change (the ids are a prefix of the same sequence).
    """
    if limit <= 0:
        return []
    if not dataset_dir.is_dir():
        raise StageError(
            f"eval.heldout_questions: no prepared dataset at {dataset_dir} (run the 'prepare' stage first)"
        )
    from datasets import load_from_disk

    dataset = load_from_disk(str(dataset_dir))
    if "eval" not in dataset:
        raise StageError(f"eval.heldout_questions: {dataset_dir} has no 'eval' split (has {sorted(dataset)})")
    split = dataset["eval"]
    missing = [c for c in HELDOUT_COLUMNS if c not in split.column_names]
    if missing:
        raise StageError(f"eval.heldout_questions: {dataset_dir} eval split lacks columns {missing}")
    known = sorted({str(s) for s in split["source"]})
    if sources:
        unknown = sorted(set(sources) - set(known))
        if unknown:
            raise StageError(f"eval.heldout_sources: unknown {unknown}; the eval split has sources {known}")
    wanted = set(sources or known)
    counters: dict[str, int] = {}
    questions: list[Question] = []
    for row in split.select_columns(list(HELDOUT_COLUMNS)):
        source = str(row["source"])
        if source not in wanted:
            continue
        question = heldout_question(row, counters.get(source, 0))
        if question is None:
            continue
        counters[source] = counters.get(source, 0) + 1
        questions.append(question)
        if len(questions) == limit:
            break
    if not questions:
        raise StageError(
            f"eval.heldout_questions: no row of the eval split in {dataset_dir} (sources {sorted(wanted)}) "
            "has an 'answer' and exactly one user turn"
        )
    return questions
