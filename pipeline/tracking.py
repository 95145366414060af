"""MLflow lineage: one parent run per pipeline run (the same record, whichever stages ran: resolved
config, git commit, package versions), one child run per executed stage, into which the stages log
with plain ``mlflow.log_*`` calls. ``mlflow`` is imported lazily so that config validation stays fast."""

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
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig

PARENT_RECORD = "mlflow_run.json"
PACKAGES = ("uora-pipeline", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "mlflow",
            "deepspeed", "bitsandbytes")  # fmt: skip


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached or written; raised before any heavy work."""


def metric_name(name: str) -> str:
    """``name`` with every character MLflow refuses in a metric name replaced by ``_``: the one rule
    for names built from data (evaluate's categories, train's per-source eval losses)."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def resolve_uri(config: PipelineConfig) -> str:
    """``tracking.uri``, or the default sqlite store ``<run_dir>/mlflow.db``."""
    return config.tracking.uri or f"sqlite:///{config.run_dir / 'mlflow.db'}"


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on this store: ``mlflow`` next to this Python (the venv)
    is named by its path when that folder is not on PATH."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    scripts = Path(sys.executable).parent
    executable = scripts / "mlflow"
    if str(scripts) in os.environ.get("PATH", "").split(os.pathsep):
        executable = Path("mlflow")
    elif scripts.is_relative_to(Path.cwd()):
        executable = executable.relative_to(Path.cwd())
    return f"{executable} ui --backend-store-uri {uri}"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, in one line, if the store at ``uri`` is unusable: one short probe, no minutes of retry."""
    parsed, problem = urllib.parse.urlparse(uri), None
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///") :]).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            problem = None if os.access(folder, os.W_OK) else f"folder {folder} is not writable"
        except OSError as error:
            problem = f"cannot create {folder} ({error})"
    elif parsed.scheme in ("http", "https"):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
        except urllib.error.HTTPError:
            pass  # the server answered (auth or routing aside): it is reachable
        except (urllib.error.URLError, OSError) as error:
            problem = f"MLflow tracking server unreachable ({getattr(error, 'reason', error)})"
    elif parsed.scheme.startswith(("postgresql", "mysql")):
        port = parsed.port or (5432 if parsed.scheme.startswith("postgresql") else 3306)
        try:
            socket.create_connection((parsed.hostname or "localhost", port), timeout=timeout).close()
        except OSError as error:
            problem = f"database unreachable ({error})"
    if problem:
        raise TrackingUnavailable(f"tracking.uri: {problem} (got {uri!r})")


def git_commit(repo: Path | None = None) -> str | None:
    """The project's git commit (with ``-dirty`` when the worktree has changes), if in a checkout."""
    repo = repo or Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def active_mlflow() -> Any:
    """``mlflow`` while a run is active, else None, without importing it: tracking off needs no mlflow."""
    mlflow = sys.modules.get("mlflow")
    return mlflow if mlflow is not None and mlflow.active_run() is not None else None


class Tracker:
    """The MLflow side of one pipeline invocation; with tracking off, every method does nothing."""

    def __init__(self, config: PipelineConfig, config_path: str | None = None):
        self.config, self.config_path = config, config_path
        self.uri, self.enabled = resolve_uri(config), config.tracking.enabled
        self.parent_id: str | None = None

    def start(self) -> str | None:
        """Start (or resume, for the same run dir and config) the parent run and log lineage."""
        if not self.enabled:
            return None
        import mlflow

        from pipeline.config import flatten, to_yaml
        from pipeline.digests import digest_of

        os.environ["MLFLOW_TRACKING_URI"] = self.uri  # worker processes inherit the store
        mlflow.set_tracking_uri(self.uri)
        name = self.config.tracking.experiment
        if mlflow.get_experiment_by_name(name) is None:  # artifacts next to a sqlite store, not in ./mlruns
            store = Path(self.uri[len("sqlite:///") :]).parent if self.uri.startswith("sqlite:///") else None
            mlflow.create_experiment(name, artifact_location=store and (store / "mlartifacts").as_uri())
        experiment_id = mlflow.set_experiment(name).experiment_id
        config_digest = digest_of(self.config.model_dump(mode="json"))
        record_file = self.config.run_dir / PARENT_RECORD
        previous = None  # the parent run recorded in the run dir, if it has this store and config
        with contextlib.suppress(Exception):  # none, unreadable, deleted or a different store: a new one
            record = json.loads(record_file.read_text())
            if record.get("uri") == self.uri and record.get("config_digest") == config_digest:
                previous = mlflow.get_run(record["run_id"]).info.run_id
        run = (mlflow.start_run(run_id=previous) if previous
               else mlflow.start_run(run_name=self.config.run.name, experiment_id=experiment_id))  # fmt: skip
        self.parent_id = run.info.run_id
        record_file.parent.mkdir(parents=True, exist_ok=True)
        record_file.write_text(json.dumps({"run_id": self.parent_id, "uri": self.uri,
                                           "config_digest": config_digest}))  # fmt: skip
        if not previous:  # MLflow logs params in batches and refuses values over 6000 characters
            mlflow.log_params({key: value[:6000] for key, value in flatten(self.config).items()})
            mlflow.log_text(to_yaml(self.config), "config.yaml")
            if self.config_path and Path(self.config_path).is_file():
                mlflow.log_artifact(self.config_path, "config_source")
        tags = {"pipeline.run_dir": str(self.config.run_dir), "pipeline.config_digest": config_digest}
        if commit := git_commit():
            tags |= {"git.commit": commit, "mlflow.source.git.commit": commit.removesuffix("-dirty")}
        for package in PACKAGES:  # the versions that determine a run's result
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                tags[f"version.{package}"] = importlib.metadata.version(package)
        mlflow.set_tags(tags)
        return self.parent_id

    def finish(self, status: str = "FINISHED") -> None:
        if not self.enabled:
            return
        import mlflow

        while mlflow.active_run() is not None:
            mlflow.end_run(status=status)

    @contextlib.contextmanager
    def stage_run(self, stage: str) -> Iterator[str | None]:
        """A child run for one stage execution, active for the duration of the block: FINISHED, FAILED
        if the block raises, KILLED if interrupted (Ctrl-C, SIGTERM) or preempted (a rerun resumes)."""
        if not self.enabled:
            yield None
            return
        import mlflow

        from pipeline.errors import StagePreempted

        run = mlflow.start_run(run_name=stage, nested=True, tags={"pipeline.stage": stage})
        try:
            yield run.info.run_id
        except BaseException as error:
            failed = isinstance(error, Exception) and not isinstance(error, StagePreempted)
            mlflow.end_run(status="FAILED" if failed else "KILLED")
            raise
        mlflow.end_run(status="FINISHED")

    def log_stage_result(self, stage: str, metrics: dict[str, float], manifest_path: Path) -> None:
        """The stage's metrics and manifest in its child run; its metrics, prefixed, on the parent too."""
        if not self.enabled:
            return
        import mlflow

        clean = {key: float(value) for key, value in metrics.items()  # numbers, not bools or NaN
                 if isinstance(value, int | float) and not isinstance(value, bool) and value == value}
        if clean:
            mlflow.log_metrics(clean)
            if self.parent_id:
                mlflow.log_metrics({f"{stage}.{k}": v for k, v in clean.items()}, run_id=self.parent_id)
        mlflow.log_artifact(str(manifest_path))


def log_dataset(dataset: Any, name: str, context: str, digest: str | None = None,
                source: str | None = None) -> None:  # fmt: skip
    """Record a ``datasets.Dataset`` as an MLflow input of the active run (``mlflow.data``)."""
    import warnings

    import mlflow

    with warnings.catch_warnings():  # a local path matches two equivalent source types; harmless
        warnings.simplefilter("ignore", UserWarning)
        record = mlflow.data.from_huggingface(dataset, name=name, digest=digest, source=source)
    mlflow.log_input(record, context=context)
