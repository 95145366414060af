"""The eval config section: judge backend rules, the key never echoed, temperatures, file checks."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipeline.config import PipelineConfig, format_validation_error
from pipeline.schema import MT_BENCH_TEMPERATURES


def _errors(eval_section):
    with pytest.raises(ValidationError) as error:
        PipelineConfig.model_validate(
            {"run": {"name": "x"}, "model": {"name_or_path": "gpt2"}, "eval": eval_section}
        )
    return format_validation_error(error.value)


def test_openai_backend_needs_the_key_variable_name_and_a_model():
    assert _errors({"judge": {"backend": "openai", "model": "gpt-4"}}) == [
        "eval.judge: api_key_env is required when backend is 'openai' (the NAME of the environment variable "
        "that holds the key, e.g. OPENAI_API_KEY)"
    ]
    assert _errors({"judge": {"backend": "openai", "api_key_env": "OPENAI_API_KEY"}}) == [
        "eval.judge: model is required when backend is 'openai' (e.g. gpt-4)"
    ]


def test_a_key_pasted_into_api_key_env_is_refused_without_echoing_it():
    lines = _errors({"judge": {"backend": "openai", "model": "m", "api_key_env": "sk-proj-abc123SECRET"}})
    assert lines == [
        "eval.judge: api_key_env must be the NAME of an environment variable, not the key itself"
    ]
    assert "SECRET" not in "".join(lines)


def test_temperatures_override_only_what_is_named():
    config = PipelineConfig.model_validate(
        {"run": {"name": "x"}, "model": {"name_or_path": "gpt2"}, "eval": {"temperatures": {"writing": 0.2}}}
    )
    assert config.eval.temperatures == {**MT_BENCH_TEMPERATURES, "writing": 0.2}
    assert MT_BENCH_TEMPERATURES["math"] == 0.0 and MT_BENCH_TEMPERATURES["roleplay"] == 0.7
    assert MT_BENCH_TEMPERATURES["humanities"] == 0.1


def test_missing_files_fail_at_validation(tmp_path):
    assert _errors({"questions": str(tmp_path / "q.jsonl")}) == [
        f"eval.questions: expected builtin, hub or an existing .jsonl file (got '{tmp_path / 'q.jsonl'}')"
    ]
    assert _errors({"judge": {"prompts": "nope.jsonl"}}) == [
        "eval.judge.prompts: file does not exist (got 'nope.jsonl')"
    ]
    assert _errors({"models": []})[0].startswith("eval.models:")


@pytest.mark.parametrize(
    ("override", "line"),
    [
        (
            "eval.judge.mode=pairs",
            "eval.judge.mode: input should be 'single', 'pairwise' or 'both' (got 'pairs')",
        ),
        ("eval.judge.samples=0", "eval.judge.samples: input should be greater than or equal to 1 (got 0)"),
        ("promote.gate=bayes", "promote.gate: input should be 'point' or 'ci' (got 'bayes')"),
        (
            "eval.verifiable_max_new_tokens=0",
            "eval.verifiable_max_new_tokens: input should be greater than 0 (got 0)",
        ),
    ],
)
def test_bad_judge_and_gate_settings_fail_validate_in_one_line(override, line, capsys):
    from pipeline.__main__ import main

    assert main(["validate", "configs/smollm2_135m.yaml", override]) == 2
    assert capsys.readouterr().err.splitlines() == [line]


def test_pairwise_judging_needs_both_models(capsys):
    from pipeline.__main__ import main

    assert main(["validate", "configs/smollm2_135m.yaml", "eval.models=[tuned]"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "eval.models: judge.mode 'both' compares tuned with base: models needs both (got ['tuned'])"
    ]
