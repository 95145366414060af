"""Judging: build the chats, run a backend, read and cache verdicts (FastChat's records, all samples, a
``cache_key`` over judge, prompt and rendered answers). Pairwise asks in both orders (``"tuned|base"``: tuned
is A); a verdict that flips with the order is a tie. An unreadable verdict is a failure, never a guess."""

from __future__ import annotations

import re
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from pipeline.digests import digest_of
from pipeline.eval.generate import read_cache
from pipeline.eval.prompts import JudgePrompt, pair_fields, prompt_fields, prompt_name
from pipeline.eval.questions import Question
from pipeline.jsonl import append_record, rewrite_records

Chat = list[dict[str, str]]
Completions = Iterator[tuple[int, list[str]]]  # (chat index, outputs), in completion order
Answers = dict[str, dict[str, dict[str, Any]]]  # model -> question id -> FastChat answer record


class JudgeBackend(Protocol):
    """A judge: ``name`` (FastChat's ``judge[0]``), ``identity()`` (what decides its outputs, no secrets)."""

    name: str

    def identity(self) -> dict[str, Any]: ...

    def complete(self, chats: list[Chat], samples: int, pairwise: bool = False) -> Completions: ...


@dataclass(frozen=True)
class JudgeTask:
    """One answer turn to grade; ``labels`` say whose (a cached verdict may be shared by several)."""

    labels: dict[str, Any]  # question_id, model ("tuned|base": a pair), turn (1-based, as FastChat), category
    prompt: JudgePrompt
    user_prompt: str
    key: str


def build_tasks(questions: list[Question], answers: Answers, prompts: dict[str, JudgePrompt],
                judge_identity: dict[str, Any], samples: int, pair: tuple[str, str] | None = None,
                ) -> list[JudgeTask]:  # fmt: skip
    """Tasks grading every model's every answer turn; with ``pair``, every turn pairwise, in both orders."""
    tasks = []  # sides: the model tuples judged on one prompt — (a, b) and (b, a) pairwise, else (model,)
    for sides in [[pair, pair[::-1]]] if pair else [[(model,)] for model in answers]:
        for q in questions:
            for turn in range(1, len(q.turns) + 1):
                prompt = prompts[prompt_name(q.category, turn, q.reference is not None, pairwise=bool(pair))]
                for models in sides:
                    said = [answers[m][str(q.question_id)]["choices"][0]["turns"] for m in models]
                    fields = (pair_fields if pair else prompt_fields)(q.turns, *said, q.reference, turn)
                    user_prompt = prompt.render(**fields)
                    payload = {"judge": judge_identity, "user_prompt": user_prompt, "samples": samples,
                               "prompt": [prompt.name, prompt.system_prompt, prompt.prompt_template]}
                    key = digest_of(payload, compact=False)
                    labels = {"question_id": q.question_id, "model": "|".join(models), "turn": turn,
                              "category": q.category}  # fmt: skip
                    tasks.append(JudgeTask(labels, prompt, user_prompt, key))
    return tasks


# Pairwise tasks: tuned as assistant A, then swapped.
build_pair_tasks = partial(build_tasks, pair=("tuned", "base"))


_NUMBER = r"\s*(\d+(?:\.\d+)?|\d+\.)\s*(?:/\s*10\s*)?"
_DOUBLE, _SINGLE = re.compile(r"\[\[" + _NUMBER + r"\]\]"), re.compile(r"\[" + _NUMBER + r"\]")
# A lone "[7]" is accepted only where it is plainly the verdict, not a citation like "see [1]".
_VERDICT_WORD = re.compile(r"(rating|score|grade|verdict)\W{0,12}$", re.IGNORECASE)
_WINNER = re.compile(r"\[\[([ABC])\]\]")


def parse_rating(text: str) -> float | None:
    """The rating in a judge's output, or ``None``. Like FastChat, ``[[x]]`` first, ``[x]`` as fallback;
    unlike it, the *last* match wins (judges quote the format, "e.g. Rating: [[5]]", before theirs),
    ``x/10`` is ``x``, ``[x]`` counts only after "rating"/"score" or at the end, and only 1-10 counts."""
    matches = list(_DOUBLE.finditer(text)) or [
        m for m in _SINGLE.finditer(text)
        if _VERDICT_WORD.search(text[max(0, m.start() - 40) : m.start()]) or not text[m.end() :].strip(" .\n")
    ]  # fmt: skip
    value = float(matches[-1].group(1)) if matches else None
    return value if value is not None and 1 <= value <= 10 else None


def parse_winner(text: str) -> str | None:
    """``"A"``, ``"B"``, ``"tie"`` (``[[C]]``) or None: the output's last FastChat pairwise verdict."""
    matches = _WINNER.findall(text or "")
    return None if not matches else {"A": "A", "B": "B", "C": "tie"}[matches[-1]]


def verdict(outputs: list[str], pairwise: bool = False) -> dict[str, Any]:
    """All samples' ratings, their median as the score and max-min as the spread; ``pairwise``, all
    samples' winners and the most common readable one (``A``, ``B`` or ``tie``), FastChat-style."""
    found = [(parse_winner if pairwise else parse_rating)(text) for text in outputs]
    valid = [v for v in found if v is not None]
    read = ({"winner": Counter(valid).most_common(1)[0][0] if valid else None, "winners": found} if pairwise
            else {"score": statistics.median(valid) if valid else None, "scores": found,
                  "spread": (max(valid) - min(valid)) if valid else None})  # fmt: skip
    return {**read, "failed": not valid, "failed_samples": len(found) - len(valid)}


def pair_outcomes(records: list[dict[str, Any]]) -> tuple[dict[tuple[str, int], int | None], int]:
    """Per (question id, turn): +1 if the pair's first model wins in both orders, -1 if the second does,
    else 0 (tie, or flips with the order: FastChat's "inconsistent"); None, counted, if one is unreadable."""
    orders: dict[tuple[str, int], list[str | None]] = defaultdict(list)
    first: dict[tuple[str, int], str] = {}
    for r in records:
        a, b = r["model"].split("|")
        first.setdefault(key := (str(r["question_id"]), r["turn"]), a)
        orders[key].append({"A": a, "B": b, "tie": "tie"}.get(r["winner"]))
    outcomes = {key: None if None in won else 0 if len(set(won)) > 1 or won[0] == "tie" else
                (1 if won[0] == first[key] else -1) for key, won in orders.items()}  # fmt: skip
    return outcomes, sum(v is None for v in outcomes.values())


def run_judging(backend: JudgeBackend, tasks: list[JudgeTask], cache_path: Path, samples: int = 1,
                progress: bool = True, pairwise: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """Judgment records for ``tasks``, in order: cached, or judged and appended as each completes."""
    cached = read_cache(cache_path)
    # Identical judge prompts (base and tuned often answer alike under greedy decoding) are judged
    # once; the verdict is then reported for every task that shares it, labelled with its model.
    todo = list({task.key: task for task in tasks if task.key not in cached}.values())
    chats = [[{"role": "system", "content": task.prompt.system_prompt},
              {"role": "user", "content": task.user_prompt}] for task in todo]  # fmt: skip
    desc = "pairwise judgments" if pairwise else "judgments"
    with tqdm(total=len(todo), desc=desc, disable=not progress) as bar:
        for index, outputs in backend.complete(chats, samples, pairwise=pairwise):
            task = todo[index]
            cached[task.key] = {**task.labels, "judge": [backend.name, task.prompt.name],
                                "user_prompt": task.user_prompt, "judgment": outputs[0],
                                "tstamp": time.time(), "judgments": outputs,
                                **verdict(outputs, pairwise), "cache_key": task.key}
            append_record(cache_path, cached[task.key])
            bar.update(1)
    records = [{**cached[task.key], **task.labels} for task in tasks]
    rewrite_records(cache_path, records)
    return records
