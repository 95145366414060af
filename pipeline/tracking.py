"""MLflow lineage (``mlflow`` imported only with tracking on): one parent run per run dir and config
(resolved config, git commit, versions), one child run per stage, where stages call ``mlflow.log_*``."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig, flatten, to_yaml
from pipeline.digests import digest_of
from pipeline.errors import StagePreempted

PACKAGES = ("uora-pipeline", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "mlflow",
            "deepspeed", "bitsandbytes")  # fmt: skip


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached or written; raised before any heavy work."""


def metric_name(name: str) -> str:
    """``name`` with each character MLflow refuses in metric names as ``_``: the one rule for data's names."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def resolve_uri(config: PipelineConfig) -> str:
    """``tracking.uri``, or the default sqlite store ``<run_dir>/mlflow.db``."""
    return config.tracking.uri or f"sqlite:///{config.run_dir / 'mlflow.db'}"


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on this store (the venv's ``mlflow`` by path if not on PATH)."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    scripts = Path(sys.executable).parent
    if str(scripts) in os.environ.get("PATH", "").split(os.pathsep):
        scripts = Path()
    elif scripts.is_relative_to(Path.cwd()):
        scripts = scripts.relative_to(Path.cwd())
    return f"{scripts / 'mlflow'} ui --backend-store-uri {uri}"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, in one line, if the store at ``uri`` is unusable: one short probe, no minutes of retry."""
    parsed, problem, failure = urllib.parse.urlparse(uri), None, ""
    try:
        if uri.startswith("sqlite:///"):
            folder = Path(uri.removeprefix("sqlite:///")).parent
            failure = f"cannot create {folder}"
            folder.mkdir(parents=True, exist_ok=True)
            problem = None if os.access(folder, os.W_OK) else f"folder {folder} is not writable"
        elif parsed.scheme in ("http", "https"):
            failure = "MLflow tracking server unreachable"
            with contextlib.suppress(urllib.error.HTTPError):  # the server answered (auth or routing aside)
                urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
        elif parsed.scheme.startswith(("postgresql", "mysql")):
            failure = "database unreachable"
            port = parsed.port or (5432 if parsed.scheme.startswith("postgresql") else 3306)
            socket.create_connection((parsed.hostname or "localhost", port), timeout=timeout).close()
    except OSError as error:  # urllib's URLError included: its reason says why
        problem = f"{failure} ({getattr(error, 'reason', error)})"
    if problem:
        raise TrackingUnavailable(f"tracking.uri: {problem} (got {uri!r})")


def git_commit() -> str | None:
    """The project's git commit (with ``-dirty`` when tracked files changed), if in a checkout."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=64", "--exclude=*"],
                              cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()  # fmt: skip
    return None


def active_mlflow() -> Any:
    """``mlflow`` while a run is active, else None, without importing it: tracking off needs no mlflow."""
    mlflow = sys.modules.get("mlflow")
    return mlflow if mlflow is not None and mlflow.active_run() is not None else None


class Tracker:
    """The MLflow side of one pipeline invocation; with tracking off, every method does nothing."""

    def __init__(self, config: PipelineConfig, config_path: str | None = None):
        self.config, self.config_path, self.uri = config, config_path, resolve_uri(config)
        self.parent_id: str | None = None
        self.mlflow: Any = None  # imported by start() when tracking is enabled

    def start(self) -> str | None:
        """Start (or resume, for the same run dir and config) the parent run and log lineage."""
        if not self.config.tracking.enabled:
            return None
        import mlflow

        os.environ["MLFLOW_TRACKING_URI"] = self.uri  # worker processes inherit the store
        mlflow.set_tracking_uri(self.uri)
        name = self.config.tracking.experiment
        if mlflow.get_experiment_by_name(name) is None:  # artifacts next to a sqlite store, not in ./mlruns
            sqlite = self.uri.startswith("sqlite:///")
            store = Path(self.uri.removeprefix("sqlite:///")).parent if sqlite else None
            mlflow.create_experiment(name, artifact_location=store and (store / "mlartifacts").as_uri())
        experiment_id = mlflow.set_experiment(name).experiment_id
        ours = {"uri": self.uri, "config_digest": digest_of(self.config.model_dump(mode="json"))}
        record_file, previous = self.config.run_dir / "mlflow_run.json", None
        with contextlib.suppress(OSError, ValueError, LookupError, AttributeError, TypeError,
                                 mlflow.exceptions.MlflowException):
            # none, unreadable, deleted, or of a different store or config: a new parent run
            recorded = json.loads(record_file.read_text())
            if ours.items() <= recorded.items():  # the parent run recorded here, of this store and config
                previous = mlflow.get_run(recorded["run_id"]).info.run_id
        self.parent_id = mlflow.start_run(run_id=previous, experiment_id=experiment_id,
                                          run_name=None if previous else self.config.run.name).info.run_id
        record_file.write_text(json.dumps({"run_id": self.parent_id, **ours}))  # the driver made run_dir
        if not previous:  # MLflow logs params in batches and refuses values over 6000 characters
            mlflow.log_params({key: value[:6000] for key, value in flatten(self.config).items()})
            mlflow.log_text(to_yaml(self.config), "config.yaml")
            if self.config_path and Path(self.config_path).is_file():
                mlflow.log_artifact(self.config_path, "config_source")
        tags = {"pipeline.run_dir": str(self.config.run_dir), "pipeline.config_digest": ours["config_digest"]}
        if commit := git_commit():
            tags |= {"git.commit": commit, "mlflow.source.git.commit": commit.removesuffix("-dirty")}
        for package in PACKAGES:  # the versions that determine a run's result
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                tags[f"version.{package}"] = importlib.metadata.version(package)
        mlflow.set_tags(tags)
        self.mlflow = mlflow
        return self.parent_id

    def finish(self, status: str = "FINISHED") -> None:
        while self.mlflow is not None and self.mlflow.active_run() is not None:
            self.mlflow.end_run(status=status)

    @contextlib.contextmanager
    def stage_run(self, stage: str) -> Iterator[str | None]:
        """A child run for the block: FINISHED, FAILED if it raises, KILLED if interrupted or preempted."""
        if self.mlflow is None:
            yield None
            return
        run = self.mlflow.start_run(run_name=stage, nested=True, tags={"pipeline.stage": stage})
        try:
            yield run.info.run_id
        except BaseException as error:
            failed = isinstance(error, Exception) and not isinstance(error, StagePreempted)
            self.mlflow.end_run(status="FAILED" if failed else "KILLED")
            raise
        self.mlflow.end_run(status="FINISHED")

    def log_stage_result(self, stage: str, metrics: dict[str, float], manifest_path: Path) -> None:
        """The stage's metrics and manifest in its child run; its metrics, prefixed, on the parent too."""
        if self.mlflow is None:
            return
        clean = {key: float(value) for key, value in metrics.items()  # numbers, not bools or NaN
                 if isinstance(value, int | float) and not isinstance(value, bool) and value == value}
        if clean:
            self.mlflow.log_metrics(clean)
            self.mlflow.log_metrics({f"{stage}.{k}": v for k, v in clean.items()}, run_id=self.parent_id)
        self.mlflow.log_artifact(str(manifest_path))


def log_dataset(dataset: Any, name: str, context: str, digest: str | None = None,
                source: str | None = None) -> None:  # fmt: skip
    """Record a ``datasets.Dataset`` as an MLflow input of the active run (``mlflow.data``)."""
    import mlflow

    with warnings.catch_warnings():  # a local path matches two equivalent source types; harmless
        warnings.simplefilter("ignore", UserWarning)
        record = mlflow.data.from_huggingface(dataset, name=name, digest=digest, source=source)
    mlflow.log_input(record, context=context)
