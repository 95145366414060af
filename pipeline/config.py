"""The run configuration: one YAML file describes one run, and this module is its only schema.

Every section is a pydantic model with ``extra="forbid"`` so a misspelt key is an error, not a
silently ignored setting. This module imports neither torch nor transformers: validating a config
must take well under a second, before anything heavy loads.

Section ownership (for contributors): each section class below belongs to the stage that reads it;
cross-section rules live in ``PipelineConfig``'s validators.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrictModel(BaseModel):
    """Base for every section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------
class RunConfig(StrictModel):
    """Where a run lives and how it is seeded."""

    name: str = Field(description="Run name; the run directory is <output_dir>/<name>.")
    output_dir: str = Field("runs", description="Parent folder of run directories.")
    seed: int = Field(42, description="Seed for data splits, training and generation.")


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------
class ModelConfig(StrictModel):
    """The base model and its tokenizer.

    ``name_or_path`` is a hub id, a local folder, or ``pkg://<python package>`` for weights that
    ship inside an installed Python package (the CPU default's SmolLM2 GGUF). With ``gguf_file``
    the GGUF checkpoint is converted once to a safetensors folder and cached.
    """

    name_or_path: str = Field(description="Hub id, local directory, or pkg://<package>.")
    gguf_file: str | None = Field(None, description="GGUF file inside name_or_path, converted once.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Compute dtype of the base weights (bfloat16/float16 need a GPU)."
    )
    load_in_8bit: bool = Field(False, description="Load base weights in 8-bit via bitsandbytes.")
    trust_remote_code: bool = Field(False, description="Allow code from the model repo to run.")
    chat_template: str | None = Field(
        None, description="Chat template override: Jinja text or a path to a .jinja file."
    )


# --------------------------------------------------------------------------------------------
# data (prepare stage)
# --------------------------------------------------------------------------------------------
class DataConfig(StrictModel):
    """Instruction data sources and the preparation rules (owned by the prepare stage)."""


# --------------------------------------------------------------------------------------------
# adapter
# --------------------------------------------------------------------------------------------
class AdapterConfig(StrictModel):
    """The PEFT adapter: UORA (ours) or the LoRA/VeRA baselines, one code path for all three."""

    method: Literal["uora", "lora", "vera"] = "uora"
    r: int = Field(64, gt=0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------
class TrainConfig(StrictModel):
    """SFT hyperparameters and distribution (owned by the train stage)."""

    deepspeed: str | None = Field(None, description="Path to a DeepSpeed JSON config (ZeRO-2/3).")


# --------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------
MT_BENCH_TEMPERATURES: dict[str, float] = {
    # FastChat llm_judge's per-category sampling temperatures (0 = greedy).
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
}


class JudgeConfig(StrictModel):
    """Who grades the answers: an OpenAI-compatible HTTP endpoint or a local transformers model.

    The API key itself never enters the config (configs are logged to MLflow): ``api_key_env``
    names the environment variable that holds it.
    """

    backend: Literal["openai", "local"] = Field(
        "local", description="openai: any OpenAI-compatible chat-completions endpoint; local: transformers."
    )
    base_url: str | None = Field(
        None, description="Endpoint root, e.g. http://127.0.0.1:8000/v1 (vLLM/TGI/llama.cpp); null = OpenAI."
    )
    model: str | None = Field(None, description="Judge model name sent to the endpoint (openai backend).")
    api_key_env: str | None = Field(
        None, description="NAME of the environment variable holding the API key (openai backend)."
    )
    local_model: ModelConfig | None = Field(
        None, description="Local judge weights (like the model section); null = the same as model."
    )
    local_scoring: Literal["generate", "logits"] = Field(
        "generate",
        description="local judge: generate an explanation and parse [[rating]], or pick the most likely "
        "rating 1-10 after 'Rating: [[' (works even for small judges that never emit the format).",
    )
    prompts: str | None = Field(
        None, description="FastChat judge_prompts.jsonl to use instead of the built-in prompt texts."
    )
    samples: int = Field(1, ge=1, description="Judge samples per answer; the median is the score.")
    temperature: float = Field(0.0, ge=0.0, description="Judge sampling temperature (0 = greedy).")
    max_new_tokens: int = Field(512, gt=0, description="Judge output budget (explanation + rating).")
    concurrency: int = Field(4, ge=1, description="Parallel HTTP requests (openai backend).")
    retries: int = Field(5, ge=0, description="HTTP retries with exponential backoff (429, 5xx, network).")
    timeout_s: float = Field(120.0, gt=0, description="HTTP timeout per request in seconds.")
    batch_size: int = Field(4, gt=0, description="Prompts per forward pass (local backend).")

    @model_validator(mode="after")
    def _check_backend(self) -> JudgeConfig:
        if self.api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            # Never echo the value: someone may have pasted the key itself here.
            raise ValueError("api_key_env must be the NAME of an environment variable, not the key itself")
        if self.backend == "openai":
            if not self.api_key_env:
                raise ValueError(
                    "api_key_env is required when backend is 'openai' (the NAME of the environment "
                    "variable that holds the key, e.g. OPENAI_API_KEY)"
                )
            if not self.model:
                raise ValueError("model is required when backend is 'openai' (e.g. gpt-4)")
        return self


class EvalConfig(StrictModel):
    """MT-Bench-style evaluation and its judge (owned by the evaluate stage)."""

    questions: str = Field(
        "builtin",
        description="builtin (the project's offline set), hub (hub_dataset), or a path to an MT-Bench "
        "question.jsonl.",
    )
    hub_dataset: str = Field("HuggingFaceH4/mt_bench_prompts", description="Hub dataset for questions=hub.")
    hub_split: str = Field("train", description="Split of hub_dataset.")
    reference_answers: str | None = Field(
        None, description="FastChat reference-answer JSONL (question_id, choices[0].turns) for grading."
    )
    builtin_verifiable: int = Field(
        2, ge=0, description="builtin set: extra generated tasks with exact-match answers."
    )
    categories: list[str] | None = Field(None, description="Evaluate only these categories.")
    question_ids: list[int | str] | None = Field(None, description="Evaluate only these question ids.")
    max_questions: int | None = Field(None, gt=0, description="Evaluate at most this many questions.")
    max_new_tokens: int = Field(1024, gt=0, description="Answer budget per turn.")
    batch_size: int = Field(8, gt=0, description="Questions generated together (left-padded).")
    temperatures: dict[str, float] = Field(
        default_factory=lambda: dict(MT_BENCH_TEMPERATURES),
        description="Sampling temperature per category (0 = greedy), as MT-Bench uses them.",
    )
    default_temperature: float = Field(0.7, ge=0.0, description="Temperature for unlisted categories.")
    models: list[Literal["base", "tuned"]] = Field(
        default_factory=lambda: ["base", "tuned"], min_length=1, description="Rows of the report."
    )
    tuned_path: str | None = Field(
        None,
        description="Evaluate this adapter folder or merged model folder as 'tuned' instead of "
        "<run_dir>/train/adapter.",
    )
    judge: JudgeConfig = Field(default_factory=JudgeConfig)


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------
class ExportConfig(StrictModel):
    """Merge-and-export (owned by the export stage)."""


# --------------------------------------------------------------------------------------------
# promote
# --------------------------------------------------------------------------------------------
class PromoteConfig(StrictModel):
    """Model-registry registration and alias promotion (owned by the promote stage)."""

    enabled: bool = False


# --------------------------------------------------------------------------------------------
# tracking
# --------------------------------------------------------------------------------------------
class TrackingConfig(StrictModel):
    """MLflow tracking; the default store is a sqlite file inside the run directory."""

    uri: str | None = Field(None, description="MLflow tracking URI; default sqlite in the run dir.")
    experiment: str = Field("uora-pipeline", description="MLflow experiment name.")


# --------------------------------------------------------------------------------------------
# the whole run
# --------------------------------------------------------------------------------------------
class PipelineConfig(StrictModel):
    """One run, all stages."""

    run: RunConfig
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    promote: PromoteConfig = Field(default_factory=PromoteConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
