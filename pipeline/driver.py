"""Runs the stages in order, skips the ones whose output is still valid, owns the MLflow parent run.

A stage's output is trusted only through its manifest (``<run_dir>/<stage>/manifest.json``): the
digest of the config slice the stage reads plus the digests of its upstream manifests. A stage
writes into ``<stage>.partial``; only after ``run`` returns does the driver write the manifest and
rename the folder into place, so an interrupted or failed stage never leaves output that a rerun
would trust. A changed upstream manifest changes every downstream identity, so reruns propagate.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import stages as stage_registry
from pipeline.config import config_slice
from pipeline.digests import digest_of, sha256
from pipeline.stages.base import StageContext, StageError, StagePreempted, StageResult

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig

MANIFEST = "manifest.json"
REPORT_THEMSELVES = ("prepare", "promote")  # stages that print their own result line
EXIT_STAGE_FAILED = 1
EXIT_TRACKING = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class Terminated(BaseException):
    """SIGTERM arrived (Slurm preemption, ``scancel``): stop like Ctrl-C, record it, exit 143."""


@dataclass
class StageReport:
    """What happened to one stage in this invocation, for the summary."""

    name: str
    status: str = "pending"  # ran | up to date | disabled | failed | preempted | not run
    seconds: float = 0.0
    detail: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


def manifest_digest(stage_dir: Path) -> str | None:
    """sha256 of a completed stage's manifest file (its identity for downstream stages)."""
    path = stage_dir / MANIFEST
    if not path.is_file():
        return None
    return sha256(path.read_bytes())


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    path = stage_dir / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class Pipeline:
    """The stage bookkeeping for one run directory (no MLflow here; see ``run_pipeline``)."""

    def __init__(self, config: PipelineConfig):
        self.config = config
        self.run_dir = config.run_dir

    def module(self, name: str) -> Any:
        return stage_registry.load_stage(name)

    def identity(self, name: str) -> dict[str, Any]:
        """What a stage's output depends on: its config slice and its inputs' manifests."""
        module = self.module(name)
        sections = tuple(getattr(module, "CONFIG_SECTIONS", ()))
        return {
            "config_digest": digest_of(config_slice(self.config, sections)),
            "inputs": {up: manifest_digest(self.run_dir / up) for up in self.inputs(name)},
        }

    def up_to_date(self, name: str) -> bool:
        """True when ``<run_dir>/<name>`` holds a manifest matching the current identity and all
        its declared outputs exist, and its inputs are themselves up to date."""
        stage_dir = self.run_dir / name
        manifest = read_manifest(stage_dir)
        if manifest is None:
            return False
        expected = self.identity(name)
        if manifest.get("config_digest") != expected["config_digest"]:
            return False
        if manifest.get("inputs") != expected["inputs"]:
            return False
        if any(not (stage_dir / rel).exists() for rel in manifest.get("outputs", {}).values()):
            return False
        return all(self.up_to_date(up) for up in self.inputs(name))

    def inputs(self, name: str) -> tuple[str, ...]:
        """The upstream stages ``name`` reads under this config: ``inputs(config)`` when the stage
        defines it (e.g. evaluate without a tuned model needs no training), else ``INPUTS``."""
        module = self.module(name)
        dynamic = getattr(module, "inputs", None)
        return tuple(dynamic(self.config)) if dynamic is not None else tuple(getattr(module, "INPUTS", ()))

    def missing_inputs(self, selected: list[str]) -> list[str]:
        """One line per selected stage whose unselected upstream has no valid output."""
        problems = []
        for name in selected:
            for up in self.inputs(name):
                if up in selected or self.disabled(up):
                    continue
                if not self.up_to_date(up):
                    problems.append(
                        f"stage '{name}' needs up-to-date output of '{up}' in {self.run_dir}; "
                        f"run it first (python -m pipeline run CONFIG --from {up})"
                    )
        return problems

    def disabled(self, name: str) -> bool:
        return name == "promote" and not self.config.promote.enabled

    def execute(self, name: str, *, force: bool, mlflow_run_id: str | None) -> tuple[StageResult, Path]:
        """Run one stage into ``<name>.partial``, write its manifest, move it into place."""
        module = self.module(name)
        work_dir = self.run_dir / f"{name}.partial"
        work_dir.mkdir(parents=True, exist_ok=True)
        identity = self.identity(name)
        started = datetime.now(timezone.utc)
        ctx = StageContext(config=self.config, run_dir=self.run_dir, work_dir=work_dir,
                           mlflow_run_id=mlflow_run_id, force=force)  # fmt: skip
        result = module.run(ctx)
        if not isinstance(result, StageResult):
            raise StageError(f"stage '{name}' returned {type(result).__name__}, not StageResult")
        for label, rel in result.outputs.items():
            if not (work_dir / rel).exists():
                raise StageError(f"stage '{name}' reported output '{label}' at {rel}, which it did not write")
        finished = datetime.now(timezone.utc)
        sections = tuple(getattr(module, "CONFIG_SECTIONS", ()))
        manifest = {
            "stage": name,
            **identity,
            "config_slice": config_slice(self.config, sections),
            "outputs": result.outputs,
            "metrics": result.metrics,
            "extra": result.extra,
            "mlflow_run_id": mlflow_run_id,
            "started_at": started.isoformat(),
            "finished_at": finished.isoformat(),
            "duration_s": round((finished - started).total_seconds(), 3),
        }
        (work_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str), encoding="utf-8")
        final = self.run_dir / name
        _replace_dir(work_dir, final)
        return result, final / MANIFEST


def _replace_dir(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``; an old ``target`` is moved aside first and deleted after, so
    at every instant ``target`` is either the old complete output, absent, or the new one."""
    old = target.with_name(target.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        target.rename(old)
    source.rename(target)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def run_pipeline(
    config: PipelineConfig,
    *,
    stages: list[str] | None = None,
    force: bool = False,
    config_path: str | None = None,
    console: Any = None,
) -> int:
    """Run ``stages`` (default: all, in order) and print a one-screen summary; returns an exit code."""
    from rich.console import Console

    console = console or Console()
    order = stage_registry.STAGE_ORDER
    selected = [name for name in order if name in (stages or order)]
    pipeline = Pipeline(config)
    problems = pipeline.missing_inputs(selected)
    if problems:
        for line in problems:
            print(line, file=sys.stderr)
        return EXIT_STAGE_FAILED
    if any(force or not (pipeline.disabled(name) or pipeline.up_to_date(name)) for name in selected):
        from pipeline.models import hub_preflight

        models = {"model": config.model, "eval.judge.local_model": config.eval.judge.local_model}
        if config.eval.judge.backend != "local" or models["eval.judge.local_model"] is None:
            del models["eval.judge.local_model"]
        problem = hub_preflight(models)
        if problem:  # before the run dir exists: a stage that never started leaves nothing
            print(problem, file=sys.stderr)
            return EXIT_STAGE_FAILED
    config.run_dir.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock, Timeout

    # One driver per run directory: a second one would race on the same .partial folders. The
    # lock is an OS file lock, so a killed driver (or a requeued Slurm job) never leaves it stale.
    lock = FileLock(str(config.run_dir / "driver.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"run dir {config.run_dir} is in use by another pipeline process", file=sys.stderr)
        return EXIT_STAGE_FAILED
    previous = _install_sigterm_handler()
    try:
        return _run_locked(config, selected, pipeline, force, config_path, console)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        lock.release()


def _install_sigterm_handler() -> Any:
    """Turn SIGTERM into an exception so the stage's MLflow run is closed as KILLED and the
    summary still prints; the stage's ``.partial`` folder stays for the resumed run."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    return signal.signal(signal.SIGTERM, handler)


def _run_locked(config: PipelineConfig, selected: list[str], pipeline: Pipeline, force: bool,
                config_path: str | None, console: Any) -> int:  # fmt: skip
    from pipeline.tracking import Tracker, TrackingUnavailable, check_reachable, resolve_uri

    uri = resolve_uri(config)
    try:
        if config.tracking.enabled:
            check_reachable(uri)
    except TrackingUnavailable as error:
        print(str(error), file=sys.stderr)
        return EXIT_TRACKING

    tracker = Tracker(config, config_path)
    try:
        tracker.start()
    except Exception as error:  # a store that answers but refuses (auth, schema, locked db)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"tracking.uri: cannot start the MLflow run on {uri}: {first}", file=sys.stderr)
        return EXIT_TRACKING
    reports = [StageReport(name) for name in selected]
    code = 0
    preempted = False
    for report in reports:
        name = report.name
        if pipeline.disabled(name):
            report.status, report.detail = "disabled", "promote.enabled is false"
            continue
        if not force and pipeline.up_to_date(name):
            report.status, report.detail = "up to date", f"{name}/"
            report.metrics = (read_manifest(config.run_dir / name) or {}).get("metrics", {})
            continue
        console.print(f"[bold]▶ {name}[/bold]")
        began = time.perf_counter()
        try:
            with tracker.stage_run(name) as child_id:
                result, manifest_path = pipeline.execute(name, force=force, mlflow_run_id=child_id)
                tracker.log_stage_result(name, result.metrics, manifest_path)
        except StagePreempted as error:
            # Preemption is not a failure: progress is saved in <stage>.partial, and exit 0 lets
            # a batch system requeue the job; the rerun resumes.
            report.status, report.detail = "preempted", str(error)
            print(f"stage '{name}' preempted: {error}", file=sys.stderr)
            preempted = True
        except StageError as error:
            report.status, report.detail = "failed", str(error)
            print(f"stage '{name}' failed: {error}", file=sys.stderr)
            code = EXIT_STAGE_FAILED
        except KeyboardInterrupt:
            report.status, report.detail = "failed", "interrupted (Ctrl-C); rerun to resume"
            print(f"stage '{name}' interrupted; rerun to resume", file=sys.stderr)
            code = EXIT_INTERRUPTED
        except Terminated:
            report.status, report.detail = "failed", "terminated (SIGTERM); rerun to resume"
            print(f"stage '{name}' terminated by SIGTERM; rerun to resume", file=sys.stderr)
            code = EXIT_TERMINATED
        except Exception as error:
            traceback.print_exc()
            report.status = "failed"
            report.detail = f"unexpected {type(error).__name__}: {error}"
            print(f"stage '{name}' failed with an unexpected error: {type(error).__name__}: {error}",
                  file=sys.stderr)  # fmt: skip
            code = EXIT_STAGE_FAILED
        else:
            report.status, report.detail, report.metrics = "ran", f"{name}/", result.metrics
        report.seconds = time.perf_counter() - began
        if report.status == "ran" and name not in REPORT_THEMSELVES:
            line = f"{name}: {key_metrics(pipeline.module(name), report.metrics)} ({report.seconds:.0f} s)"
            console.print(line, markup=False, highlight=False, soft_wrap=True)
        if code or preempted:
            break
    for report in reports:
        if report.status == "pending":
            report.status = "not run"
    stopped = preempted or code in (EXIT_INTERRUPTED, EXIT_TERMINATED)
    tracker.finish("KILLED" if stopped else "FINISHED" if code == 0 else "FAILED")
    print_summary(console, config, reports, uri, tracker.parent_id)
    return code


def key_metrics(module: Any, metrics: dict[str, Any]) -> str:
    """The few numbers that say how a stage went: its own ``summary(metrics)`` where it has one; else
    the headline numbers of ``base.*`` and ``tuned.*`` side by side (evaluate); else the first three."""
    if hasattr(module, "summary") and metrics:
        return module.summary(metrics)
    pairs = [key[5:] for key in metrics
             if key.startswith("base.") and "." not in key[5:] and f"tuned.{key[5:]}" in metrics]  # fmt: skip
    if pairs:
        pairs.sort(key=lambda name: name not in ("score_overall", "exact_match"))  # stable: then file order
        shown = (f"{name} {metrics['base.' + name]:.3g} → {metrics['tuned.' + name]:.3g}" for name in pairs)
        return ", ".join(list(shown)[:3]) + " (base → tuned)"
    numbers = [(key, value) for key, value in metrics.items() if isinstance(value, int | float)][:3]
    return ", ".join(f"{key}={value:.4g}" for key, value in numbers)


def print_summary(console: Any, config: PipelineConfig, reports: list[StageReport], uri: str,
                  parent_id: str | None) -> None:  # fmt: skip
    """One screen: what ran, how long, where the outputs are, how to open the MLflow UI."""
    from rich.table import Table

    from pipeline.tracking import ui_command

    colours = {"ran": "green", "up to date": "cyan", "disabled": "dim", "failed": "red",
               "preempted": "yellow", "not run": "dim"}  # fmt: skip
    table = Table(title=f"pipeline run '{config.run.name}'", title_justify="left")
    for column in ("stage", "status", "time", "output / reason", "key metrics"):
        table.add_column(column, overflow="fold")
    for report in reports:
        metrics = key_metrics(stage_registry.load_stage(report.name), report.metrics)
        colour = colours.get(report.status, "white")
        table.add_row(report.name, f"[{colour}]{report.status}[/{colour}]",
                      f"{report.seconds:.1f}s" if report.seconds else "", report.detail, metrics)  # fmt: skip
    console.print(table)
    lines = [f"run dir:  {config.run_dir}"]
    if not config.tracking.enabled:
        lines.append("MLflow:   off (tracking.enabled: false)")
    else:
        if parent_id:
            lines.append(f"MLflow:   experiment '{config.tracking.experiment}', parent run {parent_id}")
        lines.append(f"open UI:  {ui_command(uri)}")
    for line in lines:  # never wrapped: a command split over two lines cannot be pasted
        console.print(line, soft_wrap=True, markup=False, highlight=False)
