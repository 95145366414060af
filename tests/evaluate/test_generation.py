"""Answer generation: multi-turn context, adapters, batching, and the resumable answer cache."""

from __future__ import annotations

import json

import pytest

from pipeline.eval.generate import GenerationSettings, generate_answers, generate_batch
from pipeline.eval.questions import Question

QUESTIONS = [
    Question(1, "math", ("What is 2 + 3?", "Multiply that by 4.")),
    Question(2, "writing", ("Name a colour.", "Name another one.")),
    Question(3, "stem", ("What is H2O?", "And CO2?")),
]
GREEDY = GenerationSettings(
    max_new_tokens=6, seed=0, batch_size=2, temperatures={"math": 0.0, "stem": 0.0, "writing": 0.0}
)


class Recorder:
    """A generate_fn that records its prompts, answers deterministically, and can be 'killed'."""

    def __init__(self, fail_on_call: int | None = None):
        self.calls: list[list[str]] = []
        self.fail_on_call = fail_on_call

    def __call__(self, model, tokenizer, prompts, temperature, max_new_tokens, seed, on_token):
        self.calls.append(list(prompts))
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise KeyboardInterrupt("killed")
        return [f"reply#{len(self.calls)}.{i}" for i in range(len(prompts))]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_turn_two_prompt_contains_turn_one_and_own_answer(tokenizer, tmp_path):
    recorder = Recorder()
    settings = GenerationSettings(max_new_tokens=4, seed=0, batch_size=8, temperatures={})
    records = generate_answers(
        None,
        tokenizer,
        QUESTIONS[:1],
        settings,
        model_id="m",
        model_identity="id",
        cache_path=tmp_path / "a.jsonl",
        generate_fn=recorder,
        progress=False,
    )
    (turn1,), (turn2,) = recorder.calls
    assert turn1.endswith("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    # turn 2 is asked in the same conversation: turn 1's question, the model's own answer, then turn 2
    assert turn2.endswith(
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\nreply#1.0<|im_end|>\n"
        "<|im_start|>user\nMultiply that by 4.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert records["1"]["choices"][0]["turns"] == ["reply#1.0", "reply#2.0"]


def test_resume_after_interruption_regenerates_nothing_cached(tokenizer, tmp_path):
    cache = tmp_path / "answers" / "m.jsonl"
    settings = GenerationSettings(max_new_tokens=4, seed=0, batch_size=1, temperatures={})
    kwargs = dict(model_id="m", model_identity="id", cache_path=cache, progress=False)
    with pytest.raises(KeyboardInterrupt):  # killed while generating question 2's first turn
        generate_answers(None, tokenizer, QUESTIONS, settings, generate_fn=Recorder(fail_on_call=3), **kwargs)
    saved = [json.loads(line) for line in cache.read_text().splitlines()]
    assert [r["question_id"] for r in saved] == [1]
    with cache.open("a") as handle:
        handle.write('{"question_id": 2, "choi')  # a line cut off by the kill is ignored

    resumed = Recorder()
    records = generate_answers(None, tokenizer, QUESTIONS, settings, generate_fn=resumed, **kwargs)
    asked = "".join(p for call in resumed.calls for p in call)
    assert len(resumed.calls) == 4 and "What is 2 + 3?" not in asked  # only questions 2 and 3
    assert records["1"] == saved[0]
    # the FastChat answer format, one line per question, stale/partial lines gone
    lines = [json.loads(line) for line in cache.read_text().splitlines()]
    assert [r["question_id"] for r in lines] == [1, 2, 3]
    assert set(lines[0]) >= {"question_id", "answer_id", "model_id", "choices", "tstamp"}

    untouched = Recorder()
    assert generate_answers(None, tokenizer, QUESTIONS, settings, generate_fn=untouched, **kwargs) == records
    assert untouched.calls == []
    # other settings or another model are a different cache key: regenerated
    changed = Recorder()
    longer = GenerationSettings(max_new_tokens=5, seed=0, batch_size=1, temperatures={})
    generate_answers(None, tokenizer, QUESTIONS[:1], longer, generate_fn=changed, **kwargs)
    assert len(changed.calls) == 2
    other = Recorder()
    generate_answers(
        None, tokenizer, QUESTIONS[:1], settings, generate_fn=other, **{**kwargs, "model_identity": "x"}
    )
    assert len(other.calls) == 2


def test_questions_are_grouped_by_category_temperature(tokenizer, tmp_path):
    recorder = Recorder()
    settings = GenerationSettings(
        max_new_tokens=4, seed=0, batch_size=8, temperatures={"math": 0.0, "stem": 0.0, "writing": 0.7}
    )
    temperatures = []

    def spy(model, tok, prompts, temperature, max_new_tokens, seed, on_token):
        temperatures.append((temperature, len(prompts)))
        return recorder(model, tok, prompts, temperature, max_new_tokens, seed, on_token)

    generate_answers(
        None,
        tokenizer,
        QUESTIONS,
        settings,
        model_id="m",
        model_identity="id",
        cache_path=tmp_path / "a.jsonl",
        generate_fn=spy,
        progress=False,
    )
    assert temperatures == [(0.0, 2), (0.0, 2), (0.7, 1), (0.7, 1)]  # math+stem together, writing alone


@pytest.mark.slow
def test_batched_left_padded_generation_equals_one_by_one(smollm2):
    model, tokenizer = smollm2
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q.turns[0]}], tokenize=False, add_generation_prompt=True
        )
        for q in QUESTIONS[:2]
    ]
    batched = generate_batch(model, tokenizer, prompts, 0.0, 4, seed=0)
    single = [generate_batch(model, tokenizer, [p], 0.0, 4, seed=0)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(text, str) and text for text in batched)
    # sampling is seeded: the same seed gives the same text
    assert generate_batch(model, tokenizer, prompts[:1], 0.7, 4, seed=3) == generate_batch(
        model, tokenizer, prompts[:1], 0.7, 4, seed=3
    )


@pytest.mark.slow
def test_generation_with_and_without_adapter(smollm2_dir, lora_adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.stages.evaluate import attach_adapter

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    kwargs = dict(progress=False)
    base = generate_answers(
        model,
        tokenizer,
        QUESTIONS[:1],
        GREEDY,
        model_id="base",
        model_identity="b",
        cache_path=tmp_path / "base.jsonl",
        **kwargs,
    )
    tuned_model = attach_adapter(model, lora_adapter)
    assert isinstance(tuned_model, PeftModel)
    assert not any(getattr(m, "merged", False) for m in tuned_model.modules())  # unmerged
    tuned = generate_answers(
        tuned_model,
        tokenizer,
        QUESTIONS[:1],
        GREEDY,
        model_id="tuned",
        model_identity="t",
        cache_path=tmp_path / "tuned.jsonl",
        **kwargs,
    )
    assert len(base["1"]["choices"][0]["turns"]) == len(tuned["1"]["choices"][0]["turns"]) == 2
    assert base["1"]["choices"][0]["turns"] != tuned["1"]["choices"][0]["turns"]
    # without the adapter the model answers exactly as the base did
    with tuned_model.disable_adapter():
        again = generate_answers(
            tuned_model,
            tokenizer,
            QUESTIONS[:1],
            GREEDY,
            model_id="base",
            model_identity="b2",
            cache_path=tmp_path / "again.jsonl",
            **kwargs,
        )
    assert again["1"]["choices"] == base["1"]["choices"]


@pytest.mark.slow
def test_uora_adapter_loads_unmerged_through_attach_adapter(smollm2_dir, tmp_path):
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    import uora
    from pipeline.stages.evaluate import attach_adapter

    ids = torch.tensor([[1, 504, 3458, 314, 260, 2056, 30]])
    torch.manual_seed(0)
    trained = get_peft_model(
        AutoModelForCausalLM.from_pretrained(smollm2_dir),
        uora.UoraConfig(r=8, target_modules=["q_proj", "v_proj"]),
    )
    with torch.no_grad():  # stand-in for training: non-zero scaling vectors, so the adapter matters
        for param in trained.parameters():
            if param.requires_grad:
                param.normal_(0.0, 0.5)
    trained.eval()
    trained.save_pretrained(tmp_path / "uora_adapter")
    with torch.no_grad():
        expected = trained(ids).logits
    loaded = attach_adapter(
        AutoModelForCausalLM.from_pretrained(smollm2_dir).eval(), tmp_path / "uora_adapter"
    )
    assert loaded.peft_config["default"].peft_type == uora.UORA_PEFT_TYPE
    with torch.no_grad():
        got = loaded(ids).logits
        with loaded.disable_adapter():
            base_logits = loaded(ids).logits
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, base_logits, atol=1e-3)  # the adapter changes the model


def test_verifiable_questions_get_their_own_short_budget(tokenizer, tmp_path):
    budgets = []

    def record_budget(model, tokenizer, prompts, temperature, max_new_tokens, seed, on_token):
        budgets.append((len(prompts), max_new_tokens))
        return ["x"] * len(prompts)

    questions = [
        Question("v1", "builtin:list", ("Sort 3, 1.",), exact_answer=("1, 3",)),
        Question(2, "writing", ("Name a colour.",)),
        Question("v2", "builtin:date", ("What day?",), exact_answer=("Monday",)),
        Question(4, "math", ("What is 2 + 3?", "Only the number."), exact_answer=(None, "5")),  # turn 1 open
    ]
    settings = GenerationSettings(
        max_new_tokens=64,
        seed=0,
        batch_size=8,
        default_temperature=0.0,
        temperatures={},
        verifiable_max_new_tokens=8,
    )
    kwargs = dict(model_id="m", model_identity="id", cache_path=tmp_path / "a.jsonl", progress=False)
    records = generate_answers(None, tokenizer, questions, settings, generate_fn=record_budget, **kwargs)
    assert sorted(budgets) == [(1, 64), (2, 8), (2, 64)]  # question 4's two turns: the full budget
    assert {qid: r["generation"]["max_new_tokens"] for qid, r in records.items()} == {
        "v1": 8, "2": 64, "v2": 8, "4": 64
    }  # fmt: skip
    # the budget is part of the cache key: a different short budget regenerates only the short ones
    budgets.clear()
    settings = GenerationSettings(**{**settings.__dict__, "verifiable_max_new_tokens": 12})
    generate_answers(None, tokenizer, questions, settings, generate_fn=record_budget, **kwargs)
    assert budgets == [(2, 12)]


def test_progress_moves_per_generated_token(tokenizer, tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    steps = []
    prompts = ["<|im_start|>user\nHi<|im_end|>\n", "<|im_start|>user\nName a colour.<|im_end|>\n"]
    assert len(generate_batch(model, tokenizer, prompts, 0.0, 5, 0, lambda: steps.append(1))) == 2
    assert len(steps) == 5  # once per generated token of the batch, not per prompt token

    def two_steps(model, tok, prompts, temperature, max_new_tokens, seed, on_token):
        on_token(), on_token()
        return ["x"] * len(prompts)

    generate_answers(None, tokenizer, QUESTIONS[:2], GREEDY, model_id="m", model_identity="id",
                     cache_path=tmp_path / "a.jsonl", generate_fn=two_steps)  # fmt: skip
    final = capsys.readouterr().err.split("\r")[-1]  # the bar's last redraw
    assert "answers [m]: 100%" in final and "2/2 [" in final and "turn 2/2, token 2/6" in final
