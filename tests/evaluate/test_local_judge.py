"""The local transformers judge on SmolLM2: generated verdicts and logit-scored ratings."""

from __future__ import annotations

import pytest
import torch

from pipeline.eval.judging import parse_rating
from pipeline.eval.prompts import BUILTIN_PROMPTS, prompt_fields
from pipeline.judges import LocalJudge

pytestmark = pytest.mark.slow


def _chat(answer):
    prompt = BUILTIN_PROMPTS["single-v1"]
    user = prompt.render(**prompt_fields(("What is the capital of France?",), [answer], None, 1))
    return [{"role": "system", "content": prompt.system_prompt}, {"role": "user", "content": user}]


def _judge(smollm2, scoring, **kwargs):
    model, tokenizer = smollm2
    return LocalJudge(
        model, tokenizer, name="smollm2", identity={"backend": "local"}, scoring=scoring, **kwargs
    )


def test_logits_scoring_gives_the_most_likely_rating(smollm2):
    judge = _judge(smollm2, "logits", batch_size=2)
    chats = [_chat("Paris.")]
    results = dict(judge.complete(chats, samples=1))
    assert sorted(results) == [0]
    for outputs in results.values():
        rating = parse_rating(outputs[0])
        assert outputs[0] == f"Rating: [[{int(rating)}]]" and 1 <= rating <= 10

    # the batched candidate scores equal a plain forward pass over prompt + "Rating: [[7]]"
    prompt = judge.render(chats[0])
    scores = judge.rating_logprobs(prompt)
    model, tokenizer = smollm2
    prefix = tokenizer(prompt + "Rating: [[", add_special_tokens=False)["input_ids"]
    cand = tokenizer("7]]", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prefix + cand])).logits[0].float().log_softmax(-1)
    manual = sum(logits[len(prefix) - 1 + i, tok].item() for i, tok in enumerate(cand))
    assert scores[6] == pytest.approx(manual, abs=1e-3)
    assert results[0][0] == f"Rating: [[{max(range(10), key=scores.__getitem__) + 1}]]"


def test_expected_scoring_is_the_probability_weighted_rating(smollm2):
    judge = _judge(smollm2, "expected", batch_size=2)
    chats = [_chat("Paris."), _chat("I do not know, maybe bananas.")]
    results = dict(judge.complete(chats, samples=1))
    for index, chat in enumerate(chats):
        scores = torch.tensor(judge.rating_logprobs(judge.render(chat)), dtype=torch.float64)
        probs = scores.exp() / scores.exp().sum()  # computed independently of the judge's code
        expected = sum((k + 1) * p for k, p in enumerate(probs.tolist()))
        assert results[index] == [f"Rating: [[{expected:.2f}]]"]
        assert parse_rating(results[index][0]) == pytest.approx(expected, abs=5e-3)
        assert 1.0 <= expected <= 10.0


def test_generate_scoring_returns_the_judge_text(smollm2):
    judge = _judge(smollm2, "generate", max_new_tokens=6, batch_size=2)
    results = dict(judge.complete([_chat("Lyon.")], samples=1))
    assert sorted(results) == [0]
    for (text,) in results.values():
        assert isinstance(text, str) and text  # whatever it says; the parser decides if it is a rating
        rating = parse_rating(text)
        assert rating is None or 1 <= rating <= 10


def test_pairwise_scoring_picks_the_most_likely_verdict(smollm2):
    from pipeline.eval.judging import parse_winner
    from pipeline.eval.prompts import BUILTIN_PAIR_PROMPTS, pair_fields

    prompt = BUILTIN_PAIR_PROMPTS["pair-v2"]
    user = prompt.render(
        **pair_fields(("What is the capital of France?",), ["Paris."], ["Bananas."], None, 1)
    )
    chat = [{"role": "system", "content": prompt.system_prompt}, {"role": "user", "content": user}]
    for scoring in ("logits", "expected"):
        judge = _judge(smollm2, scoring)
        [(index, [text])] = list(judge.complete([chat], samples=1, pairwise=True))
        # independently: a plain forward pass over prompt + "Verdict: [[" + each choice
        model, tokenizer = smollm2
        rendered = judge.render(chat)
        prefix = tokenizer(rendered + "Verdict: [[", add_special_tokens=False)["input_ids"]
        scores = []
        for choice in ("A]]", "B]]", "C]]"):
            cand = tokenizer(choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([prefix + cand])).logits[0].float().log_softmax(-1)
            scores.append(sum(logits[len(prefix) - 1 + i, tok].item() for i, tok in enumerate(cand)))
        probs = torch.tensor(scores).softmax(0).tolist()
        best = "ABC"[max(range(3), key=probs.__getitem__)]
        assert index == 0 and text.startswith(f"[[{best}]] (p A {probs[0]:.3f}, B {probs[1]:.3f}")
        assert parse_winner(text) == {"A": "A", "B": "B", "C": "tie"}[best]
