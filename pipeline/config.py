"""The run configuration: one YAML file describes one run, and this module is its only schema.

Every section is a pydantic model with ``extra="forbid"`` so a misspelt key is an error, not a
silently ignored setting. This module imports neither torch nor transformers: validating a config
must take well under a second, before anything heavy loads.

Section ownership (for contributors): each section class below belongs to the stage that reads it;
cross-section rules live in ``PipelineConfig``'s validators.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError


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

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        # The name becomes a folder name: refuse anything that could escape output_dir.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
            raise ValueError("must be a folder name: letters, digits, '.', '_' or '-'")
        return value

    @property
    def run_dir(self) -> Path:
        """``<output_dir>/<name>``, absolute."""
        return (Path(self.output_dir) / self.name).resolve()


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

    @model_validator(mode="after")
    def _local_files_exist(self) -> ModelConfig:
        # Only what can be checked without importing anything heavy: pkg:// packages, local
        # folders given as paths, the GGUF file inside them, a chat-template file.
        location = self.name_or_path
        if location.startswith("pkg://"):
            import importlib.util

            spec = importlib.util.find_spec(location[len("pkg://") :])
            if spec is None or not spec.submodule_search_locations:
                raise _issue("name_or_path", "Python package is not installed", location)
            location = spec.submodule_search_locations[0]
        elif _looks_like_path(location) and not Path(location).exists():
            raise _issue("name_or_path", "local model folder does not exist", location)
        if self.gguf_file and Path(location).is_dir() and not (Path(location) / self.gguf_file).is_file():
            raise _issue("gguf_file", f"file not found in {location}", self.gguf_file)
        template = self.chat_template
        if template and "{" not in template and template.endswith(".jinja") and not Path(template).is_file():
            raise _issue("chat_template", "template file does not exist", template)
        return self


# --------------------------------------------------------------------------------------------
# data (prepare stage)
# --------------------------------------------------------------------------------------------
DataFormat = Literal["auto", "alpaca", "sharegpt", "messages", "prompt_completion"]
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")


class DataSource(StrictModel):
    """One source of examples: a local file, a hub dataset, or the built-in generated tasks.

    Exactly one of ``path``, ``hub`` or ``builtin`` is set. ``samples`` takes exactly that many
    rows (without replacement); ``weight`` gives the source a share of the weighted mixture.
    """

    path: str | None = Field(None, description="Local .json/.jsonl/.parquet/.csv file.")
    hub: str | None = Field(None, description="Hub dataset name, e.g. yahma/alpaca-cleaned.")
    config: str | None = Field(None, description="Hub dataset configuration (subset) name.")
    split: str = Field("train", description="Hub dataset split.")
    revision: str | None = Field(None, description="Hub dataset revision.")
    builtin: int | None = Field(None, gt=0, description="Number of built-in generated tasks.")
    format: DataFormat = Field("auto", description="Row format; auto detects it from the keys.")
    name: str | None = Field(None, description="Label stored in the `source` column.")
    samples: int | None = Field(None, gt=0, description="Take exactly this many rows.")
    weight: float | None = Field(None, gt=0, description="Share of the weighted mixture.")
    eval_samples: int | None = Field(
        None, gt=0, description="Hold out exactly this many of this source's rows for eval, before "
        "mixing: a fixed slice (by data.seed) that is never trained on.",
    )  # fmt: skip
    answer_from: Literal["field", "last_number"] = Field(
        "field", description="The row's checkable answer: its `answer` field, or the last number in "
        "the final assistant message (GSM8K-style solutions).",
    )  # fmt: skip

    @field_validator("path")
    @classmethod
    def _path_exists(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not value.lower().endswith(LOCAL_SUFFIXES):
            raise ValueError(f"unsupported file type (use {', '.join(LOCAL_SUFFIXES)})")
        if not Path(value).is_file():
            raise ValueError("file does not exist")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> DataSource:
        kinds = [key for key in ("path", "hub", "builtin") if getattr(self, key) is not None]
        if len(kinds) != 1:
            raise _issue("", "set exactly one of path, hub, builtin", kinds or None)
        if self.samples is not None and self.weight is not None:
            raise _issue("weight", "set samples or weight, not both", self.weight)
        return self

    @property
    def label(self) -> str:
        """The name stored in the dataset's ``source`` column."""
        if self.name:
            return self.name
        if self.path:
            return Path(self.path).name
        if self.hub:
            return self.hub + (f":{self.config}" if self.config else "")
        return "builtin"


class DataConfig(StrictModel):
    """Instruction data sources and the preparation rules (owned by the prepare stage)."""

    sources: list[DataSource] = Field(
        default_factory=lambda: [DataSource(builtin=1500)],
        min_length=1,
        description="Where examples come from; several sources are mixed.",
    )
    max_samples: int | None = Field(
        None, gt=0, description="Total rows of the weighted part of the mixture (default: as many "
        "as the weights allow without repeating rows).",
    )  # fmt: skip
    eval_fraction: float = Field(0.05, ge=0, le=0.5, description="Share of rows held out for eval.")
    eval_size: int | None = Field(None, ge=0, description="Exact eval rows; overrides eval_fraction.")
    max_length: int = Field(2048, gt=0, description="Drop examples longer than this many tokens.")
    seed: int | None = Field(
        None, description="Seed of sampling and of the train/eval split (None: run.seed). Fix it to "
        "vary run.seed (training) over identical data.",
    )  # fmt: skip
    dedupe: bool = Field(True, description="Drop exact duplicate conversations.")
    strict: bool = Field(False, description="Malformed rows are an error instead of dropped.")
    system_prompt: str | None = Field(None, description="Prepended as a system turn when none.")
    cache_dir: str | None = Field(
        None, description="Prepared-data cache (default: ~/.cache/uora-pipeline/prepared)."
    )

    @model_validator(mode="after")
    def _one_eval_rule(self) -> DataConfig:
        # Per-source slices and a share of the mixture are two answers to one question; taking
        # both silently would hold out rows nobody asked for.
        if any(source.eval_samples is not None for source in self.sources):
            for key in ("eval_fraction", "eval_size"):
                if key in self.model_fields_set:
                    raise _issue(key, "sources set eval_samples: hold out rows per source or by "
                                 f"{key}, not both", getattr(self, key))  # fmt: skip
        return self


# --------------------------------------------------------------------------------------------
# adapter
# --------------------------------------------------------------------------------------------
class ReinitConfig(StrictModel):
    """UORA's re-init rule: a rank slot whose |d| stays below threshold gets its projections moved.

    Every ``patience`` checks with ``|d[i]| < threshold``, row i of A and column i of B are
    interpolated towards a target orthogonal pair: ``A ← alpha·A + (1 − alpha)·R`` (see UORA.md).
    """

    threshold: float = Field(1e-5, ge=0, description="A slot is dead while abs(d[i]) is below this.")
    alpha: float = Field(0.5, ge=0, lt=1, description="Share of the old direction kept per event, in [0, 1).")
    patience: int = Field(1, ge=1, description="Dead checks (one per optimizer step) per re-init event.")
    target: Literal["fixed", "resample"] = Field(
        "fixed", description="fixed: one seeded target pair; resample: a fresh pair per check with events."
    )
    seed: int = Field(0, description="Seed of the target projections.")


class AdapterConfig(StrictModel):
    """The PEFT adapter: UORA (ours) or the LoRA/VeRA baselines, one code path for all three."""

    method: Literal["uora", "lora", "vera"] = Field("uora", description="Adapter method.")
    r: int = Field(64, gt=0, description="Rank.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or all-linear (every linear but lm_head)."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    modules_to_save: list[str] | None = Field(None, description="Modules trained in full and saved.")
    # uora / vera
    projection_prng_key: int = Field(0, ge=-(2**63), lt=2**64, description="Seed of the frozen shared "
                                     "projections (uora, vera; torch.Generator's range).")  # fmt: skip
    d_initial: float = Field(0.1, description="Initial value of the scaling vector d (uora, vera).")
    save_projection: bool = Field(True, description="Store projections in the checkpoint (uora, vera).")
    projection_init: Literal["orthogonal", "kaiming"] = Field(
        "orthogonal", description="Projection initialisation (uora)."
    )
    reinit: ReinitConfig = Field(default_factory=lambda: ReinitConfig(), description="Re-init rule (uora).")
    # lora
    lora_alpha: int | None = Field(None, gt=0, description="LoRA scaling numerator (lora); default 2*r.")

    @model_validator(mode="after")
    def _method_knobs(self) -> AdapterConfig:
        # A knob for another method is almost always a mistake (a copied config): say so.
        only = {"lora_alpha": "lora", "projection_init": "uora", "reinit": "uora"}
        for key, method in only.items():
            if key in self.model_fields_set and self.method != method:
                raise _issue(key, f"only used by method '{method}' (method is '{self.method}')",
                             getattr(self, key))  # fmt: skip
        if self.method == "lora":
            for key in ("projection_prng_key", "d_initial", "save_projection"):
                if key in self.model_fields_set:
                    raise _issue(key, "only used by methods 'uora' and 'vera' (method is 'lora')",
                                 getattr(self, key))  # fmt: skip
        return self


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------
class TrainConfig(StrictModel):
    """SFT hyperparameters and distribution (owned by the train stage).

    Names follow ``transformers.TrainingArguments`` / ``trl.SFTConfig`` so that users can look
    them up there; only what a run needs to state is exposed. The seed is ``run.seed``.
    """

    learning_rate: float = Field(4e-3, gt=0, description="Peak LR (UORA/VeRA ~1e-3..1e-2, LoRA ~2e-4).")
    num_train_epochs: float = Field(1.0, gt=0, description="Epochs (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Optimizer steps; > 0 overrides num_train_epochs.")
    per_device_train_batch_size: int = Field(4, gt=0, description="Sequences per process per micro-batch.")
    per_device_eval_batch_size: int = Field(4, gt=0, description="Sequences per process per eval batch.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    max_length: int = Field(1024, gt=0, description="Tokens per sequence (longer ones are truncated).")
    packing: bool = Field(False, description="Pack several conversations into one sequence.")
    packing_strategy: Literal["bfd", "wrapped"] = Field("bfd", description="bfd: best-fit decreasing.")
    gradient_checkpointing: bool = Field(True, description="Recompute activations (less memory).")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Warm-up fraction of steps.")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping (0 disables).")
    assistant_only_loss: bool = Field(
        True, description="Loss on assistant tokens only (needs a chat template with generation markers)."
    )
    template_fallback: Literal["completion_only", "error"] = Field(
        "completion_only",
        description="No training template for this model: train on the last assistant turn only, or fail.",
    )
    logging_steps: int = Field(10, gt=0, description="Log loss/lr/grad norm/tokens per second every N steps.")
    eval_steps: int | None = Field(None, gt=0, description="Eval every N steps (None: before/after).")
    eval_on_start: bool = Field(True, description="Eval before the first step (the base model's loss).")
    max_eval_samples: int | None = Field(None, gt=0, description="Cap on eval rows (None: all).")
    save_steps: int = Field(200, gt=0, description="Checkpoint every N steps (preemption also checkpoints).")
    save_total_limit: int | None = Field(2, gt=0, description="Checkpoints kept (oldest deleted first).")
    bf16: bool = Field(False, description="bfloat16 mixed precision (GPU, or CPU with torch's bf16).")
    fp16: bool = Field(False, description="float16 mixed precision (GPU).")
    use_cpu: bool | None = Field(None, description="Train on CPU; None: when no CUDA device.")
    nproc_per_node: int = Field(1, gt=0, description="Processes on this node; > 1 launches torchrun.")
    omp_num_threads: int | None = Field(None, gt=0, description="Threads per CPU worker; None: cores/procs.")
    preempt_grace_s: int = Field(300, gt=0, description="Seconds workers get to checkpoint on SIGTERM.")
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
    local_scoring: Literal["generate", "logits", "expected"] = Field(
        "generate",
        description="local judge: generate an explanation and parse [[rating]]; 'logits': the most likely "
        "rating 1-10 after 'Rating: [['; 'expected': the probability-weighted mean rating (both work for "
        "small judges that never emit the format).",
    )
    prompts: str | None = Field(
        None, description="FastChat judge_prompts.jsonl to use instead of the built-in prompt texts."
    )
    mode: Literal["single", "pairwise", "both"] = Field(
        "single",
        description="single: grade each answer 1-10; pairwise: compare tuned with base answer by answer, "
        "in both orders (a verdict that flips with the order is a tie); both.",
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
    heldout_questions: int = Field(
        0,
        ge=0,
        description="Also ask up to this many rows of the prepared eval split (<run_dir>/prepare/dataset) "
        "that have an 'answer' and one user turn, as one-turn questions 'heldout-<source>-<k>' "
        "(category = the row's source; a numeric answer also matches the response's last number); in "
        "split order, "
        "after the eval.questions selection (categories/question_ids/max_questions do not apply). "
        "Greedy unless temperatures names the source.",
    )
    heldout_sources: list[str] | None = Field(
        None, min_length=1, description="Held-out questions only from these prepare sources (labels)."
    )
    judge_verifiable: bool = Field(
        True,
        description="Also send questions whose every turn has an exact answer to the judge; false: "
        "they count only in exact match (saves judge time).",
    )
    max_new_tokens: int = Field(1024, gt=0, description="Answer budget per turn.")
    verifiable_max_new_tokens: int | None = Field(
        None,
        gt=0,
        description="Answer budget for questions whose every turn has an exact answer (None: "
        "max_new_tokens); short answers make hundreds of held-out questions affordable.",
    )
    batch_size: int = Field(8, gt=0, description="Questions generated together (left-padded).")
    temperatures: dict[str, float] = Field(
        default_factory=lambda: dict(MT_BENCH_TEMPERATURES),
        description="Sampling temperature per category (0 = greedy); unlisted MT-Bench categories keep "
        "MT-Bench's values.",
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

    @field_validator("temperatures")
    @classmethod
    def _over_mt_bench_defaults(cls, value: dict[str, float]) -> dict[str, float]:
        # Setting one category keeps MT-Bench's values for the others.
        if any(t < 0 for t in value.values()):
            raise ValueError("temperatures must be >= 0 (0 = greedy)")
        return {**MT_BENCH_TEMPERATURES, **value}

    @model_validator(mode="after")
    def _files_exist(self) -> EvalConfig:
        # Caught here, before any model loads, rather than after an hour of generation.
        if self.questions not in ("builtin", "hub") and not Path(self.questions).is_file():
            raise _issue("questions", "expected builtin, hub or an existing .jsonl file", self.questions)
        if self.reference_answers and not Path(self.reference_answers).is_file():
            raise _issue("reference_answers", "file does not exist", self.reference_answers)
        if self.judge.prompts and not Path(self.judge.prompts).is_file():
            raise _issue("judge.prompts", "file does not exist", self.judge.prompts)
        if self.judge.mode != "single" and not {"base", "tuned"} <= set(self.models):
            raise _issue(
                "judge.mode", "pairwise judging compares tuned with base: models needs both", self.judge.mode
            )
        if self.heldout_sources and not self.heldout_questions:
            raise _issue(
                "heldout_sources", "has no effect unless heldout_questions > 0", self.heldout_sources
            )
        return self


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------
class ExportConfig(StrictModel):
    """Merge-and-export (owned by the export stage).

    The merge always happens in a floating-point copy of the base (``dtype``), never in int8: when
    training used an 8-bit base, export reloads it unquantised, because rounding the merged
    weights back to int8 discards most of a low-rank update.
    """

    mode: Literal["merged", "adapter_only"] = Field(
        "merged",
        description="'merged': write a standalone HF model folder (plus the adapter); "
        "'adapter_only': keep just the adapter folder.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None,
        description="dtype of the merged weights (the base is loaded in it; merge and check run "
        "in float32); default model.dtype.",
    )
    max_shard_size: str = Field("2GB", description="Largest safetensors shard, e.g. '500MB', '5GB'.")
    verify_prompts: int = Field(
        4, ge=1, le=16, description="How many fixed prompts the merged logits are checked on."
    )
    verify_max_tokens: int = Field(96, ge=8, description="Tokens per verification prompt (truncated).")
    tolerance: float | None = Field(
        None,
        gt=0,
        description="Largest allowed |merged - (base + adapter)| logit difference, relative to the "
        "largest reference logit; default by dtype (float32 1e-4, bfloat16 3e-2, float16 1e-2).",
    )


# --------------------------------------------------------------------------------------------
# promote
# --------------------------------------------------------------------------------------------
class PromoteConfig(StrictModel):
    """Model-registry registration and alias promotion (owned by the promote stage).

    The alias moves only when the gate passes: ``gate_metric`` (a flattened evaluate metric such
    as ``tuned.score_overall``) is at or above ``threshold`` and not worse than the current
    holder of the alias by more than ``margin`` (``gate: ci``: the lower bound of the paired 95%
    interval of candidate - champion is above ``-margin``). ``--force`` moves it regardless.
    """

    enabled: bool = Field(False, description="Run promote as the pipeline's last step.")
    registered_model: str = Field(
        "uora-pipeline", min_length=1, description="Registered model name in the MLflow registry."
    )
    log: list[Literal["merged", "adapter"]] = Field(
        default_factory=lambda: ["merged"],
        min_length=1,
        description="Which exported artifacts to log as MLflow models.",
    )
    register_from: Literal["merged", "adapter"] = Field(
        "merged", description="Which logged model becomes the new registered version."
    )
    alias: str = Field("champion", min_length=1, description="Alias that marks the promoted version.")
    gate_metric: str = Field(
        "tuned.score_overall", description="Evaluate metric the gate reads ('<model>.<name>')."
    )
    gate: Literal["point", "ci"] = Field(
        "ci",
        description="ci: promote only when the 95% interval of (candidate - champion) on gate_metric, paired "
        "over shared questions, has its lower bound above -margin (no champion yet: candidate - base); "
        "point: compare the two values alone.",
    )
    threshold: float | None = Field(None, description="Minimum gate_metric value; None: no floor.")
    margin: float = Field(
        0.0, ge=0, description="How much worse than the current champion a candidate may be."
    )

    @model_validator(mode="after")
    def _register_is_logged(self) -> PromoteConfig:
        if self.register_from not in self.log:
            raise ValueError(f"register_from={self.register_from!r} must be one of log={self.log}")
        return self


# --------------------------------------------------------------------------------------------
# tracking
# --------------------------------------------------------------------------------------------
_URI_PATTERN = r"^(sqlite:///|postgresql(\+\w+)?://|mysql(\+\w+)?://|https?://|file:|databricks)"


class TrackingConfig(StrictModel):
    """MLflow tracking; the default store is a sqlite file inside the run directory."""

    enabled: bool = Field(True, description="Record the run in MLflow; false: no lineage, no promote, "
                          "and MLflow need not be installed (e.g. a GPU node without it).")  # fmt: skip
    uri: str | None = Field(None, description="MLflow tracking URI; default sqlite in the run dir.")
    experiment: str = Field("uora-pipeline", description="MLflow experiment name.")

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not re.match(_URI_PATTERN, value):
            raise ValueError(
                "unsupported tracking URI (use sqlite:///, http(s)://, postgresql://, mysql://, file:)"
            )
        return value


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

    @model_validator(mode="after")
    def _cross_section_rules(self) -> PipelineConfig:
        issues = cross_section_issues(self)
        if issues:
            context = {"summary": issues[0][1], "issues": issues}
            raise PydanticCustomError("config_rules", "{summary}", context)
        return self

    @property
    def run_dir(self) -> Path:
        return self.run.run_dir


def _read_deepspeed(path: str) -> tuple[dict[str, Any] | None, str | None]:
    """The DeepSpeed JSON at ``path``, or the reason it cannot be read."""
    file = Path(path)
    if not file.is_file():
        return None, "DeepSpeed config file does not exist"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return None, f"DeepSpeed config is not valid JSON ({error})"
    if not isinstance(data, dict):
        return None, "DeepSpeed config must be a JSON object"
    return data, None


def cross_section_issues(config: PipelineConfig) -> list[tuple[str, str, Any]]:
    """Rules that involve more than one field: ``[(dotted.path, reason, value), ...]``."""
    issues: list[tuple[str, str, Any]] = []
    adapter = config.adapter
    if adapter.method == "uora" and not adapter.save_projection:
        issues.append((
            "adapter.save_projection",
            "UORA adapters must save their projections (the re-init rule changes them; they cannot be "
            "regenerated from the seed)",
            False,
        ))  # fmt: skip
    deepspeed = getattr(config.train, "deepspeed", None)
    if deepspeed:
        data, reason = _read_deepspeed(deepspeed)
        if reason:
            issues.append(("train.deepspeed", reason, deepspeed))
        else:
            stage = (data or {}).get("zero_optimization", {}).get("stage")
            if config.model.load_in_8bit and stage == 3:
                issues.append((
                    "model.load_in_8bit",
                    f"an 8-bit base cannot be sharded by ZeRO-3 ({deepspeed}); use ZeRO-2 or a "
                    "full-precision base",
                    True,
                ))  # fmt: skip
    if config.promote.enabled and not config.tracking.enabled:
        issues.append(("promote.enabled", "promote registers in MLflow: needs tracking.enabled: true", True))
    for index, source in enumerate(config.data.sources):
        if source.hub is not None and source.format == "auto" and source.hub.endswith(LOCAL_SUFFIXES):
            issues.append((f"data.sources.{index}.hub", "looks like a file name; use path:", source.hub))
    if config.data.eval_size is not None and "eval_fraction" in config.data.model_fields_set:
        issues.append(("data.eval_size", "set eval_size or eval_fraction, not both", config.data.eval_size))
    return issues


def _issue(field: str, reason: str, value: Any) -> PydanticCustomError:
    """A validation error about ``field`` of the model being validated (a path relative to it)."""
    return PydanticCustomError(
        "config_rules", "{summary}", {"summary": reason, "issues": [(field, reason, value)], "relative": True}
    )


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or value.endswith((".gguf", ".safetensors"))


# --------------------------------------------------------------------------------------------
# loading: YAML file + command-line overrides -> PipelineConfig, or one line per problem
# --------------------------------------------------------------------------------------------
class ConfigError(Exception):
    """The config is invalid; ``lines`` holds one ``dotted.path: reason (got value)`` per problem."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _line(path: str, reason: str, value: Any = ..., *, has_value: bool = True) -> str:
    suffix = f" (got {_show(value)})" if has_value and value is not ... else ""
    return f"{path or '<config>'}: {reason}{suffix}"


def _closest_field(model: type[BaseModel] | None, key: str) -> str:
    import difflib

    if model is None:
        return ""
    match = difflib.get_close_matches(key, list(model.model_fields), n=1)
    return f"; did you mean '{match[0]}'?" if match else ""


def _model_at(path: tuple[Any, ...], root: type[BaseModel] | None = None) -> type[BaseModel] | None:
    """The section class that a location (without its last element) points into."""
    model: Any = root or PipelineConfig
    for part in path:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) else None
        if field is None:
            return None
        model = _section_type(field.annotation)
        if model is None:
            return None
    return model


def _section_type(annotation: Any) -> type[BaseModel] | None:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def format_validation_error(error: Any, root: type[BaseModel] | None = None) -> list[str]:
    """pydantic's ValidationError as ``dotted.path: reason (got value)`` lines, one per problem.

    Union alternatives produce one error per branch in pydantic; they are collapsed so the user
    sees one line per field.
    """
    lines: list[str] = []
    by_path: dict[str, int] = {}  # path -> index in lines, to merge union alternatives
    reasons: dict[str, list[str]] = {}
    for item in error.errors(include_url=False):
        loc = tuple(item["loc"])
        # Drop pydantic's union-branch tags (e.g. 'list[str]', "literal['all-linear']").
        fields = tuple(part for part in loc if isinstance(part, int) or re.fullmatch(r"\w+", str(part)))
        path = ".".join(str(part) for part in fields)
        kind = item["type"]
        if kind == "config_rules":
            ctx = item.get("ctx", {})
            for field, reason, value in ctx.get("issues", []):
                full = ".".join(p for p in (path, field) if p) if ctx.get("relative") else field
                lines.append(_line(full, reason, value))
            continue
        if kind == "extra_forbidden":
            hint = _closest_field(_model_at(fields[:-1], root), str(fields[-1]))
            reason, value, has_value = f"unknown key{hint}", item["input"], True
        elif kind == "missing":
            reason, value, has_value = "required field is missing", None, False
        else:
            # A section-level rule (a model validator) gets the whole section as its input:
            # echoing that dict is noise, and it may hold values nobody wants in a log.
            reason, value, has_value = item["msg"], item["input"], not isinstance(item["input"], dict)
            if reason.startswith("Value error, "):
                reason = reason.removeprefix("Value error, ")
            else:  # pydantic's own wording: "Input should be ..." reads better lower-cased here
                reason = reason[0].lower() + reason[1:]
        if path in by_path:  # another alternative of a union: "should be a list or 'all-linear'"
            if reason not in reasons[path]:
                reasons[path].append(reason)
                merged = reasons[path][0] + "".join(
                    " or " + r.removeprefix("input should be ") for r in reasons[path][1:]
                )
                lines[by_path[path]] = _line(path, merged, value, has_value=has_value)
            continue
        by_path[path], reasons[path] = len(lines), [reason]
        lines.append(_line(path, reason, value, has_value=has_value))
    return lines


def _field_annotation(path: list[str]) -> Any:
    """The schema annotation at a dotted path (None if the path is not in the schema)."""
    model: Any = PipelineConfig
    annotation: Any = None
    for part in path:
        if part.isdigit():
            continue
        if model is None or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = _section_type(annotation)
    return annotation


def _schema_default(path: list[str]) -> Any:
    """The JSON form of the schema default at ``path`` (so ``data.sources.0.path=...`` can
    override an item of a default list), or an empty section."""
    model: Any = PipelineConfig
    field = None
    for part in path:
        if part.isdigit() or model is None or part not in model.model_fields:
            return {}
        field = model.model_fields[part]
        model = _section_type(field.annotation)
    if field is None or (field.default_factory is None and field.default in (None, ...)):
        return {}
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_unset=True)
    if isinstance(value, list):
        return [item.model_dump(mode="json", exclude_unset=True) if isinstance(item, BaseModel) else item
                for item in value]  # fmt: skip
    return {}


def _is_plain_string(annotation: Any) -> bool:
    import typing

    if annotation is str:
        return True
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    return bool(args) and all(arg is str for arg in args)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``key.sub=value`` override to the raw config mapping, in place.

    The value is typed by the schema: string fields take it verbatim (``run.name=007`` stays the
    string "007"), everything else is parsed as YAML (numbers, booleans, null, lists).
    """
    import yaml

    key, sep, raw = override.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.(\w+))*", key.strip()):
        raise ConfigError([f"override {override!r}: expected key.sub=value, e.g. train.epochs=2"])
    parts = key.strip().split(".")
    annotation = _field_annotation(parts)
    if _is_plain_string(annotation) and raw.strip() not in ("null", "~"):
        value: Any = raw
    else:
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        here = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError([_line(here, "no such list item", override)])
            node = node[int(part)]
            continue
        if node.get(part) is None:
            node[part] = _schema_default(parts[: depth + 1])
        node = node[part]
        if not isinstance(node, dict | list):
            raise ConfigError([_line(here, "is a value, not a section", override)])
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError([_line(key, "no such list item", override)])
        node[int(last)] = value
    else:
        node[last] = value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The YAML file as a mapping; syntax errors become one line with the file and line number."""
    import yaml

    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: config file not found"]) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError([f"{path}: cannot read config file ({error})"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError([f"{path}{where}: YAML syntax error: {problem}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError([f"{path}: the config must be a YAML mapping of sections (got {kind})"])
    return data


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read, override and validate a run config; raises ConfigError with one line per problem."""
    from pydantic import ValidationError

    data = read_yaml(path)
    for override in overrides:
        apply_override(data, override)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None


def to_yaml(config: PipelineConfig) -> str:
    """The fully resolved config (defaults filled in) as YAML, for the record."""
    import yaml

    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def flatten(config: PipelineConfig) -> dict[str, str]:
    """``{"dotted.path": "value"}`` for every leaf, e.g. for MLflow params."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        elif isinstance(value, list) and value and any(isinstance(item, dict) for item in value):
            for index, item in enumerate(value):
                walk(f"{prefix}.{index}", item)
        else:
            flat[prefix] = json.dumps(value) if not isinstance(value, str) else value

    walk("", config.model_dump(mode="json"))
    return flat


def config_slice(config: PipelineConfig, keys: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """The parts of the config named by ``keys`` (sections or dotted paths to fields)."""
    dumped = config.model_dump(mode="json")
    result: dict[str, Any] = {}
    for key in keys:
        node: Any = dumped
        for part in key.split("."):
            node = node[int(part)] if isinstance(node, list) else node[part]
        result[key] = node
    return result


def digest_of(value: Any) -> str:
    """sha256 of a JSON-able value in canonical form."""
    import hashlib

    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# the reference documentation, generated from the schema (README's tables come from here)
# --------------------------------------------------------------------------------------------
SECTION_CLASSES: dict[str, type[BaseModel]] = {
    name: _section_type(field.annotation)  # type: ignore[misc]
    for name, field in PipelineConfig.model_fields.items()
}


def _type_name(annotation: Any) -> str:
    import typing

    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return " \\| ".join(str(arg) for arg in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join("null" if arg is type(None) else _type_name(arg) for arg in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]" if args else "list"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def _default_text(field: Any) -> str:
    if field.is_required():
        return "**required**"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(see below)"
    if isinstance(value, list):
        value = [item.model_dump(exclude_defaults=True) if isinstance(item, BaseModel) else item
                 for item in value]  # fmt: skip
    return f"`{json.dumps(value)}`"


def reference_markdown(sections: tuple[str, ...] | None = None) -> str:
    """Markdown tables (key, type, default, meaning) for the given sections, nested ones included."""
    blocks: list[str] = []

    def table(title: str, model: type[BaseModel]) -> None:
        rows = [f"**`{title}`** — {(model.__doc__ or '').strip().splitlines()[0]}", "",
                "| key | type | default | meaning |", "|---|---|---|---|"]  # fmt: skip
        nested = []
        for name, field in model.model_fields.items():
            description = (field.description or "").replace("|", "\\|")
            kind, default = _type_name(field.annotation), _default_text(field)
            rows.append(f"| `{name}` | {kind} | {default} | {description} |")
            inner = _section_type(field.annotation)
            if inner is not None:
                suffix = "[]" if "list" in _type_name(field.annotation) else ""
                nested.append((f"{title}.{name}{suffix}", inner))
        blocks.append("\n".join(rows))
        for inner_title, inner in nested:
            table(inner_title, inner)

    for name in sections or tuple(SECTION_CLASSES):
        table(name, SECTION_CLASSES[name])
    return "\n\n".join(blocks) + "\n"


if __name__ == "__main__":  # python -m pipeline.config [SECTION ...]: print the reference
    import sys

    print(reference_markdown(tuple(sys.argv[1:]) or None), end="")
