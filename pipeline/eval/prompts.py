"""Judge prompts for single-answer grading, in FastChat's ``judge_prompts.jsonl`` format.

MT-Bench grades each answer 1-10 with one of four prompts: a general one, a reference-guided one
for math/reasoning/coding (the judge sees a reference answer), and a multi-turn variant of each
that shows the whole conversation and grades the second answer. The texts below are the project's
own; a user may load FastChat's (or their own) from a ``judge_prompts.jsonl`` instead — the
placeholders are the same, so either file works with either source of questions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.stages.base import StageError

# Categories whose answers are graded against a reference (FastChat's NEED_REF_CATS).
REFERENCE_CATEGORIES = frozenset({"math", "reasoning", "coding"})

GENERAL, REFERENCE = "single-v1", "single-math-v1"
GENERAL_MULTI, REFERENCE_MULTI = "single-v1-multi-turn", "single-math-v1-multi-turn"
PROMPT_NAMES = (GENERAL, REFERENCE, GENERAL_MULTI, REFERENCE_MULTI)


@dataclass(frozen=True)
class JudgePrompt:
    """One FastChat judge-prompt record (single-answer grading)."""

    name: str
    system_prompt: str
    prompt_template: str
    output_format: str = "[[rating]]"

    def render(self, **fields: str) -> str:
        """The user message: the template with question/answer/reference fields filled in."""
        try:
            return self.prompt_template.format(**fields)
        except (KeyError, IndexError, ValueError) as error:
            raise StageError(
                f"judge prompt {self.name!r}: cannot fill template placeholder {error}"
            ) from None


_RATING_RULE = (
    'Then rate the answer on a scale of 1 to 10, writing the rating in exactly this format: "[[rating]]", '
    'for example "Rating: [[5]]".'
)
_CONVERSATION = (
    "<|The Start of Assistant A's Conversation with User|>\n\n### User:\n{question_1}\n\n"
    "### Assistant A:\n{answer_1}\n\n### User:\n{question_2}\n\n### Assistant A:\n{answer_2}\n\n"
    "<|The End of Assistant A's Conversation with User|>"
)
_REFERENCE_CONVERSATION = (
    "<|The Start of Reference Answer|>\n\n### User:\n{question_1}\n\n### Reference answer:\n"
    "{ref_answer_1}\n\n### User:\n{question_2}\n\n### Reference answer:\n{ref_answer_2}\n\n"
    "<|The End of Reference Answer|>\n\n\n"
)

BUILTIN_PROMPTS: dict[str, JudgePrompt] = {
    GENERAL: JudgePrompt(
        name=GENERAL,
        system_prompt="You are a fair and careful judge of AI assistant answers.",
        prompt_template=(
            "[Instruction]\nYou are grading how well an AI assistant answered the user question below. "
            "Weigh helpfulness, relevance, accuracy, depth, creativity and level of detail. Start with a "
            "brief, objective explanation. " + _RATING_RULE + "\n\n[Question]\n{question}\n\n"
            "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
        ),
    ),
    REFERENCE: JudgePrompt(
        name=REFERENCE,
        system_prompt="You are a fair and careful judge of AI assistant answers.",
        prompt_template=(
            "[Instruction]\nYou are grading how well an AI assistant answered the user question below, "
            "judging correctness first and helpfulness second. A reference answer is given: compare the "
            "assistant's answer with it, and point out and correct any mistakes in a brief, objective "
            "explanation. " + _RATING_RULE + "\n\n[Question]\n{question}\n\n"
            "[The Start of Reference Answer]\n{ref_answer_1}\n[The End of Reference Answer]\n\n"
            "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
        ),
    ),
    GENERAL_MULTI: JudgePrompt(
        name=GENERAL_MULTI,
        system_prompt=(
            "You are a fair and careful judge of AI assistant answers. You will see a conversation between "
            "a user and an AI assistant; grade only the assistant's answer to the user's SECOND question, "
            "using the first exchange as context. Weigh helpfulness, relevance, accuracy, depth, creativity "
            "and level of detail. Start with a brief, objective explanation. " + _RATING_RULE + "\n\n"
        ),
        prompt_template=_CONVERSATION,
    ),
    REFERENCE_MULTI: JudgePrompt(
        name=REFERENCE_MULTI,
        system_prompt=(
            "You are a fair and careful judge of AI assistant answers. You will see reference answers and a "
            "conversation between a user and an AI assistant; grade only the assistant's answer to the "
            "user's SECOND question, judging correctness first and helpfulness second. Compare it with the "
            "reference answer, and point out and correct any mistakes in a brief, objective explanation. "
            + _RATING_RULE
            + "\n\n"
        ),
        prompt_template=_REFERENCE_CONVERSATION + _CONVERSATION,
    ),
}


def load_prompt_file(path: Path) -> dict[str, JudgePrompt]:
    """The four single-grading prompts from a FastChat ``judge_prompts.jsonl`` (pairwise ones are
    ignored); a missing one is an error naming the file."""
    from pipeline.eval.questions import read_jsonl

    prompts: dict[str, JudgePrompt] = {}
    for where, record in read_jsonl(path, "eval.judge.prompts"):
        if not isinstance(record, dict) or record.get("name") not in PROMPT_NAMES:
            continue
        try:
            prompts[record["name"]] = JudgePrompt(
                name=record["name"],
                system_prompt=record["system_prompt"],
                prompt_template=record["prompt_template"],
                output_format=record.get("output_format", "[[rating]]"),
            )
        except KeyError as error:
            raise StageError(f"{where}: judge prompt record lacks {error}") from None
    missing = [name for name in PROMPT_NAMES if name not in prompts]
    if missing:
        raise StageError(f"eval.judge.prompts: {path} lacks the single-grading prompts {missing}")
    return prompts


def load_prompts(path: str | None) -> dict[str, JudgePrompt]:
    """The configured prompt set: the built-in texts, or a FastChat-format file."""
    return dict(BUILTIN_PROMPTS) if path is None else load_prompt_file(Path(path))


def prompt_name(category: str, turn: int, has_reference: bool) -> str:
    """Which of the four prompts grades this answer (``turn`` is 1-based).

    Reference-guided exactly for math, reasoning and coding, as MT-Bench does; when such a question
    has no reference answer the general prompt is the only honest choice.
    """
    guided = category in REFERENCE_CATEGORIES and has_reference
    if turn == 1:
        return REFERENCE if guided else GENERAL
    return REFERENCE_MULTI if guided else GENERAL_MULTI


def prompt_fields(
    turns: tuple[str, ...], answers: list[str], reference: tuple[str, ...] | None, turn: int
) -> dict[str, str]:
    """The placeholder values for grading answer ``turn`` (1-based) of one conversation."""
    ref = list(reference or ())
    ref += [""] * (2 - len(ref))
    if turn == 1:
        return {"question": turns[0], "answer": answers[0], "ref_answer_1": ref[0]}
    return {
        "question_1": turns[0],
        "answer_1": answers[0],
        "question_2": turns[1],
        "answer_2": answers[1],
        "ref_answer_1": ref[0],
        "ref_answer_2": ref[1],
    }
