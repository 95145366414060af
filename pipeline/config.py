"""The run configuration: one YAML file describes one run, and this module is its only schema.

Every section is a pydantic model with ``extra="forbid"`` so a misspelt key is an error, not a
silently ignored setting. This module imports neither torch nor transformers: validating a config
must take well under a second, before anything heavy loads.

Section ownership (for contributors): each section class below belongs to the stage that reads it;
cross-section rules live in ``PipelineConfig``'s validators.
"""

from __future__ import annotations

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
class EvalConfig(StrictModel):
    """MT-Bench-style evaluation and its judge (owned by the evaluate stage)."""


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
        description="dtype the base is reloaded in, merged in and saved in; default model.dtype.",
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
        "largest reference logit; default by dtype (float32 1e-4, bfloat16 1e-1, float16 5e-2).",
    )


# --------------------------------------------------------------------------------------------
# promote
# --------------------------------------------------------------------------------------------
class PromoteConfig(StrictModel):
    """Model-registry registration and alias promotion (owned by the promote stage).

    The alias moves only when the gate passes: ``gate_metric`` (a flattened evaluate metric such
    as ``tuned.score_overall``) is at or above ``threshold`` and not worse than the current
    holder of the alias by more than ``margin``. ``--force`` moves it regardless (recorded).
    """

    enabled: bool = False
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
