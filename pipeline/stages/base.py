"""Driver/stage contract: a stage is a module in ``pipeline.stages`` with ``NAME`` (its run-dir folder),
``INPUTS`` (upstream stages whose manifests' digests join its identity; ``inputs(config)``: those a config
reads), ``CONFIG_SECTIONS`` (its config slice, digested too), ``run(ctx)``; stages share only the run dir."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import StageError, StagePreempted  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig


@dataclass(frozen=True)
class StageContext:
    """What the driver gives a stage. Its outputs all go to ``work_dir`` (<stage>.partial: kept for a rerun
    to resume from, renamed after ``run`` returns); ``mlflow_run_id``: its MLflow child run, for workers."""
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
    """What a stage reports: metrics (MLflow, manifest), named outputs (relative to its folder), extras."""
    metrics: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
