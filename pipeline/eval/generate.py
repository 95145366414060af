"""Multi-turn answers as MT-Bench asks (turn 2 follows the model's own turn 1), in left-padded batches of one
temperature and budget; cached in a FastChat answer JSONL keyed by model, question and settings."""

from __future__ import annotations

import itertools
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tqdm.auto import tqdm

from pipeline.digests import digest_of
from pipeline.eval.questions import Question, is_verifiable
from pipeline.jsonl import append_record, read_jsonl, rewrite_records

# (model, tokenizer, prompts, temperature, max_new_tokens, seed, on_token) -> one answer per prompt;
# on_token() is called once per generation step, so progress moves while a batch is generated.
GenerateFn = Callable[[Any, Any, list[str], float, int, int, Callable[[], None]], list[str]]


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides an answer besides the model and the question."""

    max_new_tokens: int
    seed: int
    batch_size: int = 8
    temperatures: dict[str, float] = field(default_factory=dict)
    default_temperature: float = 0.7
    verifiable_max_new_tokens: int | None = None  # short answers expected: a smaller budget

    def temperature(self, category: str) -> float:
        return self.temperatures.get(category, self.default_temperature)

    def max_tokens(self, question: Question) -> int:
        return (is_verifiable(question) and self.verifiable_max_new_tokens) or self.max_new_tokens


def render_turn(tokenizer: Any, question: Question, answers: list[str], turn: int) -> str:
    """The prompt asking turn ``turn`` (0-based): earlier questions with the model's own answers first."""
    earlier = zip(question.turns[:turn], answers[:turn], strict=True)
    messages = [{"role": role, "content": text}
                for q, a in earlier for role, text in (("user", q), ("assistant", a))]  # fmt: skip
    messages.append({"role": "user", "content": question.turns[turn]})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def generate_batch(model: Any, tokenizer: Any, prompts: list[str], temperature: float, max_new_tokens: int,
                   seed: int, on_token: Callable[[], None] | None = None) -> list[str]:  # fmt: skip
    """Answers for a batch of rendered prompts (left-padded), greedy when ``temperature`` is 0."""
    import torch

    # The chat template already added BOS where the model wants one.
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                      add_special_tokens=False).to(model.device)  # fmt: skip
    sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
    sampling = sampling if temperature >= 1e-4 else {"do_sample": False}  # FastChat's rule: below, greedy
    puts = itertools.count()  # a streamer's first put (count 0: no call) is the prompt, then one per token
    streamer = on_token and SimpleNamespace(put=lambda _: next(puts) and on_token(), end=lambda: None)
    torch.manual_seed(seed)
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                streamer=streamer, **sampling)  # fmt: skip
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def read_cache(path: Path) -> dict[str, dict[str, Any]]:
    """Valid cached records by cache key; a truncated last line (killed mid-write) is ignored."""
    rows = read_jsonl(path, "cache", skip_invalid=True) if path.is_file() else []
    return {r["cache_key"]: r for _, r in rows if isinstance(r, dict) and "cache_key" in r}


def _show_step(bar: Any, label: str, total: int, steps: Iterator[int]) -> None:
    """The bar shows ``label k/total`` (redrawn at most every mininterval) while a batch is generated."""
    bar.set_postfix_str(f"{label} {next(steps)}/{total}", refresh=False)
    bar.update(0)


def generate_answers(model: Any, tokenizer: Any, questions: list[Question], settings: GenerationSettings, *,
                     model_id: str, model_identity: str, cache_path: Path, progress: bool = True,
                     generate_fn: GenerateFn = generate_batch) -> dict[str, dict[str, Any]]:
    """FastChat answer records by ``str(question_id)``: cached, or generated and saved batch by batch."""
    cached = read_cache(cache_path)
    # a question's cache key: who answered what, with which settings
    keys = {str(q.question_id): digest_of({"model": model_identity, "turns": list(q.turns),
            "seed": settings.seed, "temperature": settings.temperature(q.category),
            "max_new_tokens": settings.max_tokens(q)}, compact=False) for q in questions}  # fmt: skip
    results = {qid: cached[key] for qid, key in keys.items() if key in cached}
    groups: dict[tuple[float, int], list[Question]] = {}  # question order kept within a group
    for q in questions:
        if str(q.question_id) not in results:
            groups.setdefault((settings.temperature(q.category), settings.max_tokens(q)), []).append(q)
    size = settings.batch_size
    chunks = [(key, group[i : i + size]) for key, group in groups.items() for i in range(0, len(group), size)]
    bar = tqdm(total=len(questions), initial=len(results), desc=f"answers [{model_id}]", disable=not progress)
    for (temperature, budget), chunk in chunks:
        # A seed per chunk from its question ids: reruns of a chunk sample the same tokens.
        seed = zlib.crc32(",".join(str(q.question_id) for q in chunk).encode()) ^ settings.seed
        answers: list[list[str]] = [[] for _ in chunk]
        turns = max(len(q.turns) for q in chunk)
        for turn in range(turns):
            rows = [i for i, q in enumerate(chunk) if turn < len(q.turns)]
            prompts = [render_turn(tokenizer, chunk[i], answers[i], turn) for i in rows]
            on_token = partial(_show_step, bar, f"turn {turn + 1}/{turns}, token", budget, itertools.count(1))
            outputs = generate_fn(model, tokenizer, prompts, temperature, budget, seed + turn, on_token)
            for i, text in zip(rows, outputs, strict=True):
                answers[i].append(text)
        for q, said in zip(chunk, answers, strict=True):
            key = keys[str(q.question_id)]
            results[str(q.question_id)] = {
                "question_id": q.question_id, "answer_id": key[:22], "model_id": model_id,
                "choices": [{"index": 0, "turns": said}], "tstamp": time.time(), "category": q.category,
                "generation": {"temperature": temperature, "max_new_tokens": budget}, "cache_key": key}
            append_record(cache_path, results[str(q.question_id)])
        bar.update(len(chunk))
    bar.close()
    rewrite_records(cache_path, [results[str(q.question_id)] for q in questions])
    return results
