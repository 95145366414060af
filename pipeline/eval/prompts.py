"""Judge prompts in FastChat's ``judge_prompts.jsonl`` format (general and reference-guided, each also
multi-turn, single grading and pairwise); ours, with FastChat's placeholders, are in ``pipeline/builtin``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import StageError
from pipeline.jsonl import read_jsonl

REFERENCE_CATEGORIES = frozenset({"math", "reasoning", "coding"})  # graded against a reference: NEED_REF_CATS

PROMPT_NAMES = ("single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn")
PAIR_NAMES = ("pair-v2", "pair-math-v1", "pair-v2-multi-turn", "pair-math-v1-multi-turn")


@dataclass(frozen=True)
class JudgePrompt:
    """One FastChat judge-prompt record."""

    name: str
    system_prompt: str
    prompt_template: str
    output_format: str = "[[rating]]"

    def render(self, **fields: str) -> str:
        """The user message: the template with question/answer/reference fields filled in."""
        try:
            return self.prompt_template.format(**fields)
        except (KeyError, IndexError, ValueError) as e:
            raise StageError(f"judge prompt {self.name!r}: cannot fill template placeholder {e}") from None


def load_prompt_file(path: Path, names: tuple[str, ...] = PROMPT_NAMES) -> dict[str, JudgePrompt]:
    """The prompts ``names`` from a FastChat ``judge_prompts.jsonl`` (others ignored); all must be there."""
    prompts: dict[str, JudgePrompt] = {}
    for where, record in read_jsonl(path, "eval.judge.prompts"):
        try:
            if isinstance(record, dict) and record.get("name") in names:
                prompts[record["name"]] = JudgePrompt(
                    record["name"], record["system_prompt"], record["prompt_template"],
                    record.get("output_format", "[[A]]" if names == PAIR_NAMES else "[[rating]]"),
                )  # fmt: skip
        except KeyError as error:
            raise StageError(f"{where}: judge prompt record lacks {error}") from None
    if missing := [name for name in names if name not in prompts]:
        kind = "pairwise" if names == PAIR_NAMES else "single-grading"
        raise StageError(f"eval.judge.prompts: {path} lacks the {kind} prompts {missing}")
    return prompts


BUILTIN_FILE = Path(__file__).resolve().parents[1] / "builtin" / "judge_prompts.jsonl"
BUILTIN_PROMPTS = load_prompt_file(BUILTIN_FILE)
BUILTIN_PAIR_PROMPTS = load_prompt_file(BUILTIN_FILE, PAIR_NAMES)


def load_prompts(path: str | None, mode: str = "single") -> dict[str, JudgePrompt]:
    """The prompts judge mode ``mode`` needs: the built-in texts, or a FastChat-format file."""
    groups = [names for names, other in ((PROMPT_NAMES, "pairwise"), (PAIR_NAMES, "single")) if mode != other]
    return {k: v for names in groups for k, v in load_prompt_file(Path(path or BUILTIN_FILE), names).items()}


def prompt_name(category: str, turn: int, has_reference: bool, pairwise: bool = False) -> str:
    """The prompt grading this answer (``turn`` 1-based): with a reference in REFERENCE_CATEGORIES, guided."""
    guided = category in REFERENCE_CATEGORIES and has_reference
    return (PAIR_NAMES if pairwise else PROMPT_NAMES)[(2 if turn > 1 else 0) + guided]


def prompt_fields(turns: tuple[str, ...], answers: list[str], reference: tuple[str, ...] | None, turn: int,
                  ) -> dict[str, str]:  # fmt: skip
    """The placeholder values for grading answer ``turn`` (1-based) of one conversation."""
    ref = [*(reference or ()), "", ""]
    if turn == 1:
        return {"question": turns[0], "answer": answers[0], "ref_answer_1": ref[0]}
    return {"question_1": turns[0], "answer_1": answers[0], "question_2": turns[1], "answer_2": answers[1],
            "ref_answer_1": ref[0], "ref_answer_2": ref[1]}  # fmt: skip


def pair_fields(turns: tuple[str, ...], answers_a: list[str], answers_b: list[str],
                reference: tuple[str, ...] | None, turn: int) -> dict[str, str]:  # fmt: skip
    """``prompt_fields`` for assistants A and B: ``answer_1`` is ``answer_a_1``/``answer_b_1`` (FastChat)."""
    return {re.sub("^answer", f"answer_{side}", k): v for side, said in (("a", answers_a), ("b", answers_b))
            for k, v in prompt_fields(turns, said, reference, turn).items()}  # fmt: skip
