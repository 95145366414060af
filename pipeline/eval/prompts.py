"""Judge prompts, in FastChat's ``judge_prompts.jsonl`` format.

MT-Bench grades each answer 1-10 with one of four prompts: a general one, a reference-guided one
for math/reasoning/coding (the judge sees a reference answer), and a multi-turn variant of each
that shows the whole conversation and grades the second answer. Pairwise judging has the same
four shapes showing two assistants' answers (``pair-v2``, ``pair-math-v1`` and their multi-turn
variants) and asks for ``[[A]]``, ``[[B]]`` or ``[[C]]`` (tie). The texts below are the project's
own; a user may load FastChat's (or their own) from a ``judge_prompts.jsonl`` instead — the
placeholders are the same, so either file works with either source of questions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import StageError

# Categories whose answers are graded against a reference (FastChat's NEED_REF_CATS).
REFERENCE_CATEGORIES = frozenset({"math", "reasoning", "coding"})

GENERAL, REFERENCE = "single-v1", "single-math-v1"
GENERAL_MULTI, REFERENCE_MULTI = "single-v1-multi-turn", "single-math-v1-multi-turn"
PROMPT_NAMES = (GENERAL, REFERENCE, GENERAL_MULTI, REFERENCE_MULTI)
PAIR_NAMES = ("pair-v2", "pair-math-v1", "pair-v2-multi-turn", "pair-math-v1-multi-turn")


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


_PAIR_RULE = (
    "Neither the order of the answers, nor their length, nor the assistants' names may influence you. "
    'After a brief explanation, give your verdict in exactly this format: "[[A]]" if assistant A is '
    'better, "[[B]]" if assistant B is better, "[[C]]" for a tie.'
)
_PAIR_JUDGE = "You are a fair and careful judge comparing two AI assistants' answers to the same user "
_SECOND = "questions; compare only the answers to the SECOND question. "
_GENERAL_RULE = "Weigh helpfulness, relevance, accuracy, depth, creativity and level of detail. "
_REFERENCE_RULE = (
    "Judge correctness first and helpfulness second: compare both answers with the reference answer and "
    "point out their mistakes. "
)
_ANSWER = "\n\n[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]"
_PAIR_ANSWERS = _ANSWER + _ANSWER.replace("A'", "B'").replace("answer_a", "answer_b")
_PAIR_CONVERSATION = "\n\n\n".join(
    _CONVERSATION.replace("Assistant A", f"Assistant {side}").replace("{answer_", f"{{answer_{side.lower()}_")
    for side in "AB"
)
_QUESTION = "[User Question]\n{question}"
_REFERENCE_BLOCK = "\n\n[The Start of Reference Answer]\n{ref_answer_1}\n[The End of Reference Answer]"
BUILTIN_PAIR_PROMPTS: dict[str, JudgePrompt] = {
    name: JudgePrompt(name, _PAIR_JUDGE + system + _PAIR_RULE, template, "[[A]]")
    for name, system, template in (
        ("pair-v2", "question. " + _GENERAL_RULE, _QUESTION + _PAIR_ANSWERS),
        ("pair-math-v1", "question. " + _REFERENCE_RULE, _QUESTION + _REFERENCE_BLOCK + _PAIR_ANSWERS),
        ("pair-v2-multi-turn", _SECOND + _GENERAL_RULE, _PAIR_CONVERSATION),
        ("pair-math-v1-multi-turn", _SECOND + _REFERENCE_RULE, _REFERENCE_CONVERSATION + _PAIR_CONVERSATION),
    )
}


def load_prompt_file(path: Path, names: tuple[str, ...] = PROMPT_NAMES) -> dict[str, JudgePrompt]:
    """The prompts ``names`` (default: the four single-grading ones) from a FastChat
    ``judge_prompts.jsonl`` (other records are ignored); a missing one is an error naming the file."""
    from pipeline.jsonl import read_jsonl

    prompts: dict[str, JudgePrompt] = {}
    for where, record in read_jsonl(path, "eval.judge.prompts"):
        if not isinstance(record, dict) or record.get("name") not in names:
            continue
        try:
            prompts[record["name"]] = JudgePrompt(
                name=record["name"],
                system_prompt=record["system_prompt"],
                prompt_template=record["prompt_template"],
                output_format=record.get("output_format", "[[A]]" if names == PAIR_NAMES else "[[rating]]"),
            )
        except KeyError as error:
            raise StageError(f"{where}: judge prompt record lacks {error}") from None
    missing = [name for name in names if name not in prompts]
    if missing:
        kind = "pairwise" if names == PAIR_NAMES else "single-grading"
        raise StageError(f"eval.judge.prompts: {path} lacks the {kind} prompts {missing}")
    return prompts


def load_prompts(path: str | None, mode: str = "single") -> dict[str, JudgePrompt]:
    """The prompts judge mode ``mode`` needs: the built-in texts, or a FastChat-format file."""
    prompts: dict[str, JudgePrompt] = {}
    for names, builtin, wanted in ((PROMPT_NAMES, BUILTIN_PROMPTS, mode != "pairwise"),
                                   (PAIR_NAMES, BUILTIN_PAIR_PROMPTS, mode != "single")):  # fmt: skip
        if wanted:
            prompts.update(builtin if path is None else load_prompt_file(Path(path), names))
    return prompts


def prompt_name(category: str, turn: int, has_reference: bool, pairwise: bool = False) -> str:
    """Which of the four prompts grades this answer (``turn`` is 1-based).

    Reference-guided exactly for math, reasoning and coding, as MT-Bench does; when such a question
    has no reference answer the general prompt is the only honest choice.
    """
    guided = category in REFERENCE_CATEGORIES and has_reference
    names = PAIR_NAMES if pairwise else PROMPT_NAMES
    return names[(2 if turn > 1 else 0) + guided]


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


def pair_fields(
    turns: tuple[str, ...],
    answers_a: list[str],
    answers_b: list[str],
    reference: tuple[str, ...] | None,
    turn: int,
) -> dict[str, str]:
    """``prompt_fields`` for two assistants: ``answer`` becomes ``answer_a``/``answer_b``,
    ``answer_1`` becomes ``answer_a_1``/``answer_b_1`` (FastChat's pairwise placeholders)."""
    fields: dict[str, str] = {}
    for side, answers in (("a", answers_a), ("b", answers_b)):
        for key, value in prompt_fields(turns, answers, reference, turn).items():
            fields[key.replace("answer", f"answer_{side}", 1) if key.startswith("answer") else key] = value
    return fields
