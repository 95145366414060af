"""The run configuration: one YAML file describes one run, and this module is its only schema.

Every section is a pydantic model with ``extra="forbid"`` so a misspelt key is an error, not a
silently ignored setting. This module imports neither torch nor transformers: validating a config
must take well under a second, before anything heavy loads.

Section ownership (for contributors): each section class below belongs to the stage that reads it;
cross-section rules live in ``PipelineConfig``'s validators.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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
    max_eval_samples: int | None = Field(None, gt=0, description="Cap on eval rows (None: all).")
    save_steps: int = Field(200, gt=0, description="Checkpoint every N steps (preemption also checkpoints).")
    save_total_limit: int | None = Field(2, gt=0, description="Checkpoints kept (oldest deleted first).")
    bf16: bool = Field(False, description="bfloat16 mixed precision (GPU).")
    fp16: bool = Field(False, description="float16 mixed precision (GPU).")
    use_cpu: bool | None = Field(None, description="Train on CPU; None: when no CUDA device.")
    nproc_per_node: int = Field(1, gt=0, description="Processes on this node; > 1 launches torchrun.")
    omp_num_threads: int | None = Field(None, gt=0, description="Threads per CPU worker; None: cores/procs.")
    preempt_grace_s: int = Field(300, gt=0, description="Seconds workers get to checkpoint on SIGTERM.")
    deepspeed: str | None = Field(None, description="Path to a DeepSpeed JSON config (ZeRO-2/3).")


# --------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------
class EvalConfig(StrictModel):
    """MT-Bench-style evaluation and its judge (owned by the evaluate stage)."""


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
