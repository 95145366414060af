"""Single-answer grading: build the judge chats, run a backend, parse and cache the verdicts.

One judgment grades one answer turn of one model. Records are FastChat's single-judgment format
(``question_id``, ``model``, ``judge: [judge model, prompt name]``, ``user_prompt``, ``judgment``,
``score``, ``turn``, ``tstamp``) with a few additions: every sample's text and rating, the median
and spread over samples, ``failed`` for verdicts without a readable rating (``score`` is then null,
never a number), and the ``cache_key``. The key covers the judge's identity, the prompt texts and
the rendered prompt (which contains the answer), so a changed answer or judge is re-judged and
nothing else is.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.eval.generate import append_record, digest, read_cache, rewrite_records
from pipeline.eval.prompts import JudgePrompt, prompt_fields, prompt_name
from pipeline.eval.questions import Question
from pipeline.eval.ratings import parse_rating
from pipeline.judges import JudgeBackend


@dataclass(frozen=True)
class JudgeTask:
    """One answer turn to grade."""

    question: Question
    model_id: str
    turn: int  # 1-based, like FastChat
    prompt: JudgePrompt
    user_prompt: str
    key: str

    @property
    def labels(self) -> dict[str, Any]:
        """The fields that say whose answer a judgment grades (a cached verdict may be shared)."""
        return {"question_id": self.question.question_id, "model": self.model_id, "turn": self.turn,
                "category": self.question.category}  # fmt: skip

    @property
    def chat(self) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": self.prompt.system_prompt},
            {"role": "user", "content": self.user_prompt},
        ]


def build_tasks(
    questions: list[Question],
    answers: dict[str, dict[str, dict[str, Any]]],
    prompts: dict[str, JudgePrompt],
    judge_identity: dict[str, Any],
    samples: int,
) -> list[JudgeTask]:
    """Grading tasks for every model's every answer turn (``answers``: model -> qid -> record)."""
    tasks = []
    for model_id, records in answers.items():
        for q in questions:
            turns_answered = records[str(q.question_id)]["choices"][0]["turns"]
            for turn in range(1, len(q.turns) + 1):
                prompt = prompts[prompt_name(q.category, turn, q.reference is not None)]
                user_prompt = prompt.render(**prompt_fields(q.turns, turns_answered, q.reference, turn))
                key = digest(
                    {
                        "judge": judge_identity,
                        "prompt": [prompt.name, prompt.system_prompt, prompt.prompt_template],
                        "user_prompt": user_prompt,
                        "samples": samples,
                    }
                )
                tasks.append(JudgeTask(q, model_id, turn, prompt, user_prompt, key))
    return tasks


def verdict(outputs: list[str]) -> dict[str, Any]:
    """Ratings of all samples, their median as the score and max-min as the spread."""
    ratings = [parse_rating(text) for text in outputs]
    valid = [r for r in ratings if r is not None]
    return {
        "score": statistics.median(valid) if valid else None,
        "scores": ratings,
        "spread": (max(valid) - min(valid)) if valid else None,
        "failed": not valid,
        "failed_samples": len(ratings) - len(valid),
    }


def run_judging(
    backend: JudgeBackend,
    tasks: list[JudgeTask],
    cache_path: Path,
    samples: int = 1,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Judgment records for ``tasks`` (same order): cached ones reused, the rest judged and appended
    to ``cache_path`` as each completes, so an interrupted run loses nothing already judged."""
    from tqdm.auto import tqdm

    cached = read_cache(cache_path)
    # Identical judge prompts (base and tuned often answer alike under greedy decoding) are judged
    # once; the verdict is then reported for every task that shares it, labelled with its model.
    todo = list({task.key: task for task in tasks if task.key not in cached}.values())
    bar = tqdm(total=len(todo), desc="judgments", disable=not progress)
    for index, outputs in backend.complete([task.chat for task in todo], samples):
        task = todo[index]
        record = {
            **task.labels,
            "judge": [backend.name, task.prompt.name],
            "user_prompt": task.user_prompt,
            "judgment": outputs[0],
            "tstamp": time.time(),
            "judgments": outputs,
            **verdict(outputs),
            "cache_key": task.key,
        }
        append_record(cache_path, record)
        cached[task.key] = record
        bar.update(1)
    bar.close()
    records = [{**cached[task.key], **task.labels} for task in tasks]
    rewrite_records(cache_path, records)
    return records
