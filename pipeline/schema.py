"""The run config's schema, torch-free: a strict pydantic model per YAML section. Rules live on their field,
so the error names it (cross-section: ``PipelineConfig``); ``adapter:``/``train:`` keys are PEFT's/TRL's."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.functional_validators import AfterValidator, BeforeValidator, field_validator, model_validator
from pydantic_core import PydanticCustomError


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check(reason: str, ok: Callable[..., Any], *fields: str) -> AfterValidator:
    """A field rule: ``ok(value, *earlier fields' values)`` holds for a set value, else ``reason``."""
    def check(value: Any, info: Any) -> Any:
        if value is not None and not ok(value, *(others := [info.data.get(name) for name in fields])):
            raise ValueError(reason.format(*others, field=info.field_name))
        return value
    return AfterValidator(check)


# Checked at validation, not an hour into a run; a run name becomes a folder: nothing may escape output_dir.
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
IS_FILE = _check("file does not exist", lambda path: not path or Path(path).is_file())
ExistingFile = Annotated[str | None, IS_FILE]
DataFile = Annotated[str | None, _check(f"unsupported file type (use {', '.join(LOCAL_SUFFIXES)})",
                                        lambda path: path.lower().endswith(LOCAL_SUFFIXES)), IS_FILE]
ModelLocation = Annotated[str,  # pkg://<package>: installed; a local path (/, ./, ~, *.gguf, ...): existing
    _check("Python package is not installed", lambda name: not name.startswith("pkg://")
           or getattr(find_spec(name[6:]), "submodule_search_locations", None)),
    _check("local model folder does not exist", lambda name: Path(name).exists()
           or not (name.startswith(("/", "./", "../", "~")) or name.endswith((".gguf", ".safetensors"))))]
FolderName = Annotated[str, _check("must be a folder name: letters, digits, '.', '_' or '-'",
                                   lambda name: re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name))]
Template = Annotated[str | None, _check("template file does not exist", lambda text: "{" in text
                                        or not text.endswith(".jinja") or Path(text).is_file())]
DeepSpeedFile = Annotated[str | None, _check("DeepSpeed config file does not exist",
                                             lambda path: Path(path).is_file())]
Questions = Annotated[str, _check("expected builtin, hub or an existing .jsonl file",
                                  lambda name: name in ("builtin", "hub") or Path(name).is_file())]
TrackingUri = Annotated[str | None, _check(  # \Z: an empty URI is unset (the default store)
    "unsupported tracking URI (use sqlite:///, http(s)://, postgresql://, mysql://, file:)",
    re.compile(r"(sqlite:///|(postgresql|mysql)(\+\w+)?://|https?://|file:|databricks|\Z)").match)]
PER_SOURCE_EVAL = _check("sources set eval_samples: hold out rows per source or by {field}, not both",
                         lambda _, sources: all(s.eval_samples is None for s in sources or ()), "sources")


class RunConfig(StrictModel):
    """Where a run lives and how it is seeded."""
    name: FolderName = Field(description="Run name; the run directory is <output_dir>/<name>.")
    output_dir: str = Field("runs", description="Parent folder of run directories.")
    seed: int = Field(42, description="Seed for data splits, training and generation.")


class ModelConfig(StrictModel):
    """The base model and its tokenizer (``pkg://<package>``: weights shipped in a Python package)."""
    name_or_path: ModelLocation = Field(description="Hub id, local directory, or pkg://<package>.")
    gguf_file: str | None = Field(None, description="GGUF file inside name_or_path, converted once.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Compute dtype of the base weights (bfloat16, float16: a GPU).")  # fmt: skip
    load_in_8bit: bool = Field(False, description="Load base weights in 8-bit via bitsandbytes.")
    trust_remote_code: bool = Field(False, description="Allow code from the model repo to run.")
    chat_template: Template = Field(None, description="Chat template override: Jinja text or .jinja file.")

    @field_validator("gguf_file")
    def _gguf_exists(cls, value: str | None, info: Any) -> str | None:
        from pipeline.models import resolve_package_dir
        folder = resolve_package_dir(info.data.get("name_or_path") or "")
        if value and folder and Path(folder).is_dir() and not (Path(folder) / value).is_file():
            raise ValueError(f"file not found in {folder}")
        return value


class DataSource(StrictModel):
    """One source of examples: exactly one of a local file, a hub dataset or built-in generated tasks."""
    path: DataFile = Field(None, description="Local .json/.jsonl/.parquet/.csv file.")
    hub: str | None = Field(None, description="Hub dataset name, e.g. yahma/alpaca-cleaned.")
    config: str | None = Field(None, description="Hub dataset configuration (subset) name.")
    split: str = Field("train", description="Hub dataset split.")
    revision: str | None = Field(None, description="Hub dataset revision.")
    builtin: int | None = Field(None, gt=0, description="Number of built-in generated tasks.")
    format: Literal["auto", "alpaca", "sharegpt", "messages", "prompt_completion"] = Field(
        "auto", description="Row format; auto detects it from the keys.")  # fmt: skip
    name: str | None = Field(None, description="Label stored in the `source` column.")
    samples: int | None = Field(None, gt=0, description="Take exactly this many rows (no replacement).")
    weight: Annotated[float | None, _check("set samples or weight, not both", lambda _, n: n is None,
        "samples")] = Field(None, gt=0, description="Share of the weighted mixture.")  # fmt: skip
    eval_samples: int | None = Field(None, gt=0, description="Hold out exactly this many of this source's "
        "rows for eval, before mixing (a fixed slice by data.seed).")  # fmt: skip
    answer_from: Literal["field", "last_number"] = Field("field", description="The row's checkable answer: "
        "its `answer` field, or the last number of the reply.")  # fmt: skip

    @model_validator(mode="after")
    def _one_kind(self) -> DataSource:
        kinds = [key for key in ("path", "hub", "builtin") if getattr(self, key) is not None]
        if len(kinds) != 1:
            raise ValueError(f"set exactly one of path, hub, builtin (got {kinds or None})")
        if self.hub is not None and self.format == "auto" and self.hub.endswith(LOCAL_SUFFIXES):
            raise ValueError(f"hub {self.hub!r} looks like a file name; use path:")
        return self

    @property
    def label(self) -> str:
        hub = self.hub and self.hub + (f":{self.config}" if self.config else "")
        return self.name or (self.path and Path(self.path).name) or hub or "builtin"


class DataConfig(StrictModel):
    """Instruction data sources and the preparation rules (owned by the prepare stage)."""
    sources: list[DataSource] = Field(default_factory=lambda: [DataSource(builtin=1500)], min_length=1,
        description="Where examples come from; several sources are mixed.")  # fmt: skip
    max_samples: int | None = Field(None, gt=0, description="Rows of the weighted part of the mixture "
        "(default: as many as the weights allow without repeating rows).")  # fmt: skip
    eval_size: Annotated[int | None, PER_SOURCE_EVAL] = Field(None, ge=0, description="Exact eval rows; "
                                                              "excludes eval_fraction.")  # fmt: skip
    eval_fraction: Annotated[float, PER_SOURCE_EVAL, _check("set eval_size or eval_fraction, not both",
        lambda _, size: size is None, "eval_size")] = Field(0.05, ge=0, le=0.5, description="Share of rows "
        "held out for eval.")  # fmt: skip
    max_length: int = Field(2048, gt=0, description="Drop examples longer than this many tokens.")
    seed: int | None = Field(None, description="Seed of sampling and of the train/eval split (None: "
                             "run.seed); fix it to vary run.seed over identical data.")  # fmt: skip
    dedupe: bool = Field(True, description="Drop exact duplicate conversations.")
    strict: bool = Field(False, description="Malformed rows are an error instead of dropped.")
    system_prompt: str | None = Field(None, description="Prepended as a system turn when none.")
    cache_dir: str | None = Field(None, description="Prepared-data cache (~/.cache/uora-pipeline/prepared).")


# adapter: one model per method; field names, defaults and bounds are the method's PEFT config's.
SEED = {"ge": -(2**63), "lt": 2**64, "description": "Seed of the frozen shared projections."}  # torch's
DROPOUT = {"ge": 0, "lt": 1, "description": "Dropout on the adapter input."}
METHOD = "The adapter method (default uora); it decides which other keys the section takes."


class AdapterBase(StrictModel):
    """What every method's PEFT config takes."""
    method: str = Field(description=METHOD)
    r: int = Field(64, gt=0, description="Rank (64 for every method; PEFT's defaults differ).")
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description="Module names to "
        "adapt, or all-linear (every linear but lm_head).")  # fmt: skip
    modules_to_save: list[str] | None = Field(None, description="Modules trained in full and saved.")


class UoraAdapter(AdapterBase):
    """UORA (ours): ``uora.UoraConfig``'s fields (the projections are always saved: no save_projection)."""
    method: Literal["uora"] = Field("uora", description=METHOD)
    uora_dropout: float = Field(0.0, **DROPOUT)
    projection_prng_key: int = Field(0, **SEED)
    d_initial: float = Field(0.1, description="Initial value of the scaling vector d.")
    projection_init: Literal["orthogonal", "kaiming"] = Field("orthogonal", description="Haar or Kaiming.")
    reinit_threshold: float = Field(1e-5, ge=0, description="A slot is dead while abs(d[i]) is below this.")
    reinit_alpha: float = Field(0.5, ge=0, lt=1, description="Share of the old direction kept per event.")
    reinit_patience: int = Field(1, ge=1, description="Dead checks (one per optimizer step) per event.")
    reinit_target: Literal["fixed", "resample"] = Field("fixed", description="fixed: one seeded target "
        "pair; resample: a fresh pair per check with events.")  # fmt: skip
    reinit_seed: int = Field(0, description="Seed of the re-initialisation targets.")


class LoraAdapter(AdapterBase):
    """LoRA: ``peft.LoraConfig``'s fields."""
    method: Literal["lora"] = Field("lora", description=METHOD)
    lora_alpha: int = Field(default_factory=lambda data: 2 * data.get("r", 64), gt=0,
                            description="Scaling numerator; default 2*r (PEFT: 8): alpha/r = 2.")  # fmt: skip
    lora_dropout: float = Field(0.0, **DROPOUT)


class VeraAdapter(AdapterBase):
    """VeRA: ``peft.VeraConfig``'s fields."""
    method: Literal["vera"] = Field("vera", description=METHOD)
    vera_dropout: float = Field(0.0, **DROPOUT)
    projection_prng_key: int = Field(0, **SEED)
    d_initial: float = Field(0.1, description="Initial value of the scaling vector d.")
    save_projection: bool = Field(True, description="Store projections in the checkpoint.")


ADAPTERS: dict[str, type[AdapterBase]] = {"uora": UoraAdapter, "lora": LoraAdapter, "vera": VeraAdapter}
AdapterConfig = Annotated[UoraAdapter | LoraAdapter | VeraAdapter, Field(discriminator="method"),
    BeforeValidator(lambda value: {"method": "uora", **value} if isinstance(value, dict) else value)]


class SFTArgs(StrictModel):
    """The ``trl.SFTConfig`` fields a run states, under SFTConfig's names, passed to it unchanged."""
    learning_rate: float = Field(4e-3, gt=0, description="Peak LR (UORA/VeRA ~1e-3..1e-2, LoRA ~2e-4).")
    num_train_epochs: float = Field(1.0, gt=0, description="Epochs (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Optimizer steps; > 0 overrides num_train_epochs.")
    per_device_train_batch_size: int = Field(4, gt=0, description="Sequences per process per micro-batch.")
    per_device_eval_batch_size: int = Field(4, gt=0, description="Sequences per process per eval batch.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    max_length: int = Field(1024, gt=0, description="Tokens per sequence (longer ones are truncated).")
    packing: bool = Field(False, description="Pack several conversations into one sequence.")
    packing_strategy: Literal["bfd", "wrapped"] = Field("bfd", description="bfd: best-fit decreasing.")
    activation_checkpointing: bool = Field(True, description="Recompute activations (less memory).")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_steps: float = Field(0.03, ge=0, description="Warm-up steps; below 1: a fraction of all steps.")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping (0 disables).")
    assistant_only_loss: bool = Field(True, description="Loss on assistant tokens only (needs a chat "
                                      "template with generation markers).")  # fmt: skip
    logging_steps: int = Field(10, gt=0, description="Log loss/lr/grad norm/throughput every N steps.")
    eval_steps: int | None = Field(None, gt=0, description="Eval every N steps (None: before/after).")
    eval_on_start: bool = Field(True, description="Eval before the first step (the base model's loss).")
    save_steps: int = Field(200, gt=0, description="Checkpoint every N steps (preemption also checkpoints).")
    save_total_limit: int | None = Field(2, gt=0, description="Checkpoints kept (oldest deleted first).")
    bf16: bool = Field(False, description="bfloat16 mixed precision (GPU, or CPU with torch's bf16).")
    fp16: bool = Field(False, description="float16 mixed precision (GPU).")
    deepspeed: DeepSpeedFile = Field(None, description="Path to a DeepSpeed JSON config (ZeRO-2/3).")

    @field_validator("deepspeed")
    def _deepspeed_json(cls, value: str | None) -> str | None:
        try:
            data = json.loads(Path(value).read_text(encoding="utf-8")) if value else {}
        except (OSError, ValueError) as error:
            raise ValueError(f"DeepSpeed config is not valid JSON ({error})") from None
        if not isinstance(data, dict):
            raise ValueError("DeepSpeed config must be a JSON object")
        return value


class TrainConfig(SFTArgs):
    """SFT hyperparameters and distribution (owned by the train stage). The seed is ``run.seed``."""
    template_fallback: Literal["completion_only", "error"] = Field("completion_only", description="No "
        "training template for this model: train on the last assistant turn only, or fail.")  # fmt: skip
    max_eval_samples: int | None = Field(None, gt=0, description="Cap on eval rows (None: all).")
    use_cpu: bool | None = Field(None, description="Train on CPU; None: when no CUDA device.")
    nproc_per_node: int = Field(1, gt=0, description="Processes on this node; > 1 launches torchrun.")
    omp_num_threads: int | None = Field(None, gt=0, description="Threads per CPU worker; None: cores/procs.")
    preempt_grace_s: int = Field(300, gt=0, description="Seconds workers get to checkpoint on SIGTERM.")

    def sft_kwargs(self) -> dict[str, Any]:
        """The ``trl.SFTConfig`` keyword arguments: the inherited keys (the pipeline's own never reach it)."""
        return self.model_dump(include=set(SFTArgs.model_fields))

    @property
    def zero_stage(self) -> int:
        """The DeepSpeed config's ZeRO stage (0 without one)."""
        zero = json.loads(Path(self.deepspeed).read_text(encoding="utf-8")) if self.deepspeed else {}
        return int(zero.get("zero_optimization", {}).get("stage", 0))


# FastChat llm_judge's per-category sampling temperatures (0 = greedy); a config's are laid over them.
MT_BENCH_TEMPERATURES: dict[str, float] = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0,
                                           "coding": 0.0, "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
Temperatures = Annotated[dict[str, float], AfterValidator(lambda temps: {**MT_BENCH_TEMPERATURES, **temps}),
    _check("temperatures must be >= 0 (0 = greedy)", lambda temps: not any(t < 0 for t in temps.values()))]
EvalModels = Annotated[list[Literal["base", "tuned"]], _check(
    "judge.mode {0.mode!r} compares tuned with base: models needs both",
    lambda models, judge: not judge or judge.mode == "single" or {"base", "tuned"} <= set(models), "judge")]


class JudgeConfig(StrictModel):
    """Who grades the answers: an OpenAI-compatible HTTP endpoint or a local transformers model."""
    backend: Literal["openai", "local"] = Field("local", description="openai: any OpenAI-compatible "
        "chat-completions endpoint; local: transformers.")  # fmt: skip
    base_url: str | None = Field(None, description="Endpoint root, e.g. http://127.0.0.1:8000/v1 "
                                 "(vLLM/TGI/llama.cpp); null = OpenAI.")  # fmt: skip
    model: str | None = Field(None, description="Judge model name sent to the endpoint (openai backend).")
    api_key_env: str | None = Field(None, description="NAME of the API key's env variable (openai backend).")
    local_model: ModelConfig | None = Field(None, description="Local judge weights (like the model "
                                            "section); null = the same as model.")  # fmt: skip
    local_scoring: Literal["generate", "logits", "expected"] = Field("generate", description="local judge: "
        "parse [[rating]] from its output; logits: the most likely rating; expected: the probability-"
        "weighted mean rating (for small judges that never write the format).")  # fmt: skip
    prompts: ExistingFile = Field(None, description="FastChat judge_prompts.jsonl replacing the built-ins.")
    mode: Literal["single", "pairwise", "both"] = Field("single", description="single: grade each answer "
        "1-10; pairwise: tuned vs base, in both orders (a verdict that flips is a tie); both.")  # fmt: skip
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
            # The key never enters the config (it is logged to MLflow), nor this line: it may be the key.
            raise ValueError("api_key_env must be the NAME of an environment variable, not the key itself")
        for key, hint in (("api_key_env", "the NAME of the environment variable that holds the key, e.g. "
                           "OPENAI_API_KEY"), ("model", "e.g. gpt-4")):  # fmt: skip
            if self.backend == "openai" and not getattr(self, key):
                raise ValueError(f"{key} is required when backend is 'openai' ({hint})")
        return self


class EvalConfig(StrictModel):
    """MT-Bench-style evaluation and its judge (owned by the evaluate stage)."""
    questions: Questions = Field("builtin", description="builtin (the project's offline set), hub "
                                 "(hub_dataset), or a path to an MT-Bench question.jsonl.")  # fmt: skip
    hub_dataset: str = Field("HuggingFaceH4/mt_bench_prompts", description="Hub dataset for questions=hub.")
    hub_split: str = Field("train", description="Split of hub_dataset.")
    reference_answers: ExistingFile = Field(None, description="FastChat reference-answer JSONL "
                                            "(question_id, choices[0].turns) for grading.")  # fmt: skip
    builtin_verifiable: int = Field(2, ge=0, description="builtin set: extra generated exact-answer tasks.")
    categories: list[str] | None = Field(None, description="Evaluate only these categories.")
    question_ids: list[int | str] | None = Field(None, description="Evaluate only these question ids.")
    max_questions: int | None = Field(None, gt=0, description="Evaluate at most this many questions.")
    heldout_questions: int = Field(0, ge=0, description="Also ask up to this many rows of the prepared eval "
        "split that have an 'answer' and one user turn, as one-turn questions (category: the row's "
        "source), after the eval.questions selection; greedy unless temperatures names it.")  # fmt: skip
    heldout_sources: Annotated[list[str] | None, _check("has no effect unless heldout_questions > 0",
        lambda _, n: n, "heldout_questions")] = Field(None, min_length=1, description="Held-out questions "
        "only from these prepare sources (labels).")  # fmt: skip
    judge_verifiable: bool = Field(True, description="Also judge questions whose every turn has an exact "
                                   "answer; false: they count only in exact match.")  # fmt: skip
    max_new_tokens: int = Field(1024, gt=0, description="Answer budget per turn.")
    verifiable_max_new_tokens: int | None = Field(None, gt=0, description="Answer budget for questions "
        "whose every turn has an exact answer (None: max_new_tokens).")  # fmt: skip
    batch_size: int = Field(8, gt=0, description="Questions generated together (left-padded).")
    temperatures: Temperatures = Field(default_factory=lambda: dict(MT_BENCH_TEMPERATURES), description=
        "Sampling temperature per category (0 = greedy); other MT-Bench categories: MT-Bench's.")  # fmt: skip
    default_temperature: float = Field(0.7, ge=0.0, description="Temperature for unlisted categories.")
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    models: EvalModels = Field(default_factory=lambda: ["base", "tuned"], min_length=1,
                               description="Rows of the report.")  # fmt: skip
    tuned_path: str | None = Field(None, description="Evaluate this adapter folder or merged model folder "
                                   "as 'tuned' instead of <run_dir>/train/adapter.")  # fmt: skip


class ExportConfig(StrictModel):
    """Merge-and-export (owned by the export stage); an 8-bit base is merged unquantised, never in int8."""
    mode: Literal["merged", "adapter_only"] = Field("merged", description="'merged': a standalone HF model "
        "folder (plus the adapter); 'adapter_only': the adapter.")  # fmt: skip
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(None, description="dtype of the merged "
        "weights (merge and check run in float32); default model.dtype.")  # fmt: skip
    max_shard_size: str = Field("2GB", description="Largest safetensors shard, e.g. '500MB', '5GB'.")
    verify_prompts: int = Field(4, ge=1, le=16, description="Fixed prompts the merged logits are checked on.")
    verify_max_tokens: int = Field(96, ge=8, description="Tokens per verification prompt (truncated).")
    tolerance: float | None = Field(None, gt=0, description="Largest |merged - (base + adapter)| logit "
        "difference allowed, relative to the largest logit (default: fp32 1e-4, bf16 3e-2, fp16 1e-2).")


class PromoteConfig(StrictModel):
    """Model-registry registration and alias promotion (owned by the promote stage); the alias moves only
    when the gate (below) passes, or with ``--force``."""
    enabled: bool = Field(False, description="Run promote as the pipeline's last step.")
    registered_model: str = Field("uora-pipeline", min_length=1, description="Registered model name.")
    log: list[Literal["merged", "adapter"]] = Field(default_factory=lambda: ["merged"], min_length=1,
        description="Exported artifacts logged as models.")  # fmt: skip
    register_from: Literal["merged", "adapter"] = Field("merged", description="The logged model that "
                                                        "becomes the new registered version.")  # fmt: skip
    alias: str = Field("champion", min_length=1, description="Alias that marks the promoted version.")
    gate_metric: str = Field("tuned.score_overall", description="Metric the gate reads ('<model>.<name>').")
    gate: Literal["point", "ci"] = Field("ci", description="ci: the 95% interval of candidate - champion, "
        "paired over shared questions, must be above -margin (no champion: - base); point: values alone.")
    threshold: float | None = Field(None, description="Minimum gate_metric value; None: no floor.")
    margin: float = Field(0.0, ge=0, description="How much worse than the champion a candidate may be.")

    @model_validator(mode="after")
    def _register_is_logged(self) -> PromoteConfig:
        if self.register_from not in self.log:
            raise ValueError(f"register_from={self.register_from!r} must be one of log={self.log}")
        return self


class TrackingConfig(StrictModel):
    """MLflow tracking; the default store is a sqlite file inside the run directory."""
    enabled: bool = Field(True, description="Record the run in MLflow; false: no lineage, no promote, "
                          "and MLflow need not be installed (e.g. a GPU node without it).")  # fmt: skip
    uri: TrackingUri = Field(None, description="MLflow tracking URI; default sqlite in the run dir.")
    experiment: str = Field("uora-pipeline", description="MLflow experiment name.")


class PipelineConfig(StrictModel):
    """One run, all stages."""
    run: RunConfig
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    adapter: AdapterConfig = Field(default_factory=UoraAdapter)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    promote: PromoteConfig = Field(default_factory=PromoteConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _cross_section(self) -> PipelineConfig:
        """The rules that span sections; no one field owns them, so they name their own paths."""
        lines = []
        if self.model.load_in_8bit and self.train.zero_stage == 3:
            lines.append(f"model.load_in_8bit: an 8-bit base cannot be sharded by ZeRO-3 "
                         f"({self.train.deepspeed}); use ZeRO-2 or a full-precision base (got True)")
        if self.promote.enabled and not self.tracking.enabled:
            lines.append("promote.enabled: promote registers in MLflow: needs tracking.enabled: true "
                         "(got True)")  # fmt: skip
        if lines:
            raise PydanticCustomError("cross_section", "{lines}", {"lines": lines})
        return self

    @property
    def run_dir(self) -> Path:
        return (Path(self.run.output_dir) / self.run.name).resolve()
