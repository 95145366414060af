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
