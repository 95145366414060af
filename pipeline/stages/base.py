"""The contract between the driver and the stages.

A stage is a module in ``pipeline.stages`` that defines:

- ``NAME``: its name, also the name of its folder under the run directory;
- ``INPUTS``: the upstream stages whose outputs it reads (their manifests' digests become part of
  this stage's identity, so a changed upstream output re-runs it); optionally
  ``inputs(config) -> tuple[str, ...]``, the subset actually read under a given config;
- ``CONFIG_SECTIONS``: the config sections that determine its output (their digest is recorded in
  the manifest; a change re-runs the stage);
- ``run(ctx: StageContext) -> StageResult``.

Stages never import each other: they communicate only through the run directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import StageError, StagePreempted

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig

__all__ = ["StageContext", "StageError", "StagePreempted", "StageResult"]


@dataclass(frozen=True)
class StageContext:
    """Everything a stage gets from the driver.

    ``work_dir`` is ``<run_dir>/<stage>.partial``: the stage writes all its outputs there. It is
    stable across reruns so a stage may resume from what an interrupted attempt left (training
    checkpoints, cached answers); the driver renames it to ``<run_dir>/<stage>`` only after
    ``run`` returns, so an interrupted stage never leaves output that looks complete.

    While ``run`` executes, the stage's MLflow child run is the active run (``mlflow.log_*``
    works directly); ``mlflow_run_id`` is its id, for worker processes the stage launches.
    """

    config: PipelineConfig
    run_dir: Path
    work_dir: Path
    mlflow_run_id: str | None = None
    force: bool = False

    def input_dir(self, stage: str) -> Path:
        """The completed output folder of an upstream stage."""
        path = self.run_dir / stage
        if not path.is_dir():
            raise StageError(f"stage input missing: {path} (run the '{stage}' stage first)")
        return path


@dataclass
class StageResult:
    """What a stage reports back: metrics for MLflow and the manifest, and its named outputs."""

    metrics: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)  # name -> path relative to the stage dir
    extra: dict[str, Any] = field(default_factory=dict)  # anything else worth keeping in the manifest
