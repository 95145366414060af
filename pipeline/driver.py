"""Runs the stages in order, skipping those whose manifest (``<stage>/manifest.json``: digests of the config
slice a stage reads and of its upstream manifests) still matches; owns the MLflow parent run. A stage writes
into ``<stage>.partial``, renamed with its manifest only after ``run`` returns: a failure leaves no output."""

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
from pipeline.models import hub_preflight
from pipeline.stages.base import StageContext, StageError, StagePreempted, StageResult
from pipeline.tracking import Tracker, TrackingUnavailable, check_reachable, resolve_uri, ui_command

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig

MANIFEST = "manifest.json"
REPORT_THEMSELVES = ("prepare", "promote")  # stages that print their own result line
EXIT_STAGE_FAILED, EXIT_TRACKING = 1, 2


class Terminated(BaseException):
    """SIGTERM arrived (Slurm preemption, ``scancel``): stop like Ctrl-C, record it, exit 143."""
    @staticmethod
    def on_signal(signum: int, frame: Any) -> None:
        raise Terminated()


# A stage that raised: (summary detail, stderr line, exit code; MLflow status FAILED for 1, else KILLED).
OUTCOMES = {
    StagePreempted: ("{error}", "preempted: {error}", 0),
    StageError: ("{error}", "failed: {error}", 1),
    KeyboardInterrupt: ("interrupted (Ctrl-C); rerun to resume", "interrupted; rerun to resume", 130),
    Terminated: ("terminated (SIGTERM); rerun to resume", "terminated by SIGTERM; rerun to resume", 143),
    Exception: ("unexpected {kind}: {error}", "failed with an unexpected error: {kind}: {error}", 1),
}


@dataclass
class StageReport:
    """What happened to one stage in this invocation, for the summary."""
    name: str
    status: str = "not run"  # ran | up to date | disabled | failed | preempted | not run
    seconds: float = 0.0
    detail: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


def manifest_digest(stage_dir: Path) -> str | None:
    """sha256 of a completed stage's manifest file (its identity for downstream stages)."""
    path = stage_dir / MANIFEST
    return sha256(path.read_bytes()) if path.is_file() else None


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((stage_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class Pipeline:
    """The stage bookkeeping for one run directory (no MLflow here; see ``run_pipeline``)."""
    def __init__(self, config: PipelineConfig):
        self.config, self.run_dir = config, config.run_dir

    def identity(self, name: str) -> dict[str, Any]:
        """What a stage's output depends on: its config slice and its inputs' manifests."""
        sections = stage_registry.load_stage(name).CONFIG_SECTIONS
        return {"config_digest": digest_of(config_slice(self.config, sections)),
                "inputs": {up: manifest_digest(self.run_dir / up) for up in self.inputs(name)}}  # fmt: skip

    def up_to_date(self, name: str) -> bool:
        """A manifest matching the current identity, all its outputs there, its inputs up to date."""
        stage_dir, expected = self.run_dir / name, self.identity(name)
        manifest = read_manifest(stage_dir) or {}
        return ({key: manifest.get(key) for key in expected} == expected
                and all((stage_dir / rel).exists() for rel in manifest.get("outputs", {}).values())
                and all(self.up_to_date(up) for up in self.inputs(name)))  # fmt: skip

    def inputs(self, name: str) -> tuple[str, ...]:
        """The upstream stages ``name`` reads under this config: its ``inputs(config)``, else ``INPUTS``."""
        module = stage_registry.load_stage(name)
        return tuple(module.inputs(self.config)) if hasattr(module, "inputs") else tuple(module.INPUTS)

    def missing_inputs(self, selected: list[str]) -> list[str]:
        """One line per selected stage whose unselected upstream has no valid output."""
        return [f"stage '{name}' needs up-to-date output of '{up}' in {self.run_dir}; "
                f"run it first (python -m pipeline run CONFIG --from {up})"
                for name in selected for up in self.inputs(name)
                if up not in selected and not self.disabled(up) and not self.up_to_date(up)]  # fmt: skip

    def disabled(self, name: str) -> bool:
        return name == "promote" and not self.config.promote.enabled

    def execute(self, name: str, *, force: bool, mlflow_run_id: str | None) -> tuple[StageResult, Path]:
        """Run one stage into ``<name>.partial``, write its manifest, move it into place."""
        module, work_dir = stage_registry.load_stage(name), self.run_dir / f"{name}.partial"
        work_dir.mkdir(parents=True, exist_ok=True)
        identity, started = self.identity(name), datetime.now(timezone.utc)
        result = module.run(StageContext(config=self.config, run_dir=self.run_dir, work_dir=work_dir,
                                         mlflow_run_id=mlflow_run_id, force=force))  # fmt: skip
        for label, rel in result.outputs.items():
            if not (work_dir / rel).exists():
                raise StageError(f"stage '{name}' reported output '{label}' at {rel}, which it did not write")
        finished, sliced = datetime.now(timezone.utc), config_slice(self.config, module.CONFIG_SECTIONS)
        manifest = {"stage": name, **identity, "config_slice": sliced, "outputs": result.outputs,
                    "metrics": result.metrics, "extra": result.extra, "mlflow_run_id": mlflow_run_id,
                    "started_at": started.isoformat(), "finished_at": finished.isoformat(),
                    "duration_s": round((finished - started).total_seconds(), 3)}  # fmt: skip
        (work_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str), encoding="utf-8")
        # An old output is moved aside and deleted after: <name> is always old, absent or new, complete.
        final, old = self.run_dir / name, self.run_dir / f"{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        work_dir.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        return result, final / MANIFEST


def run_pipeline(config: PipelineConfig, *, stages: list[str] | None = None, force: bool = False,
                 config_path: str | None = None, console: Any = None) -> int:  # fmt: skip
    """Run ``stages`` (default: all, in order) and print a one-screen summary; returns an exit code."""
    from filelock import FileLock, Timeout
    from rich.console import Console
    console, order = console or Console(), stage_registry.STAGE_ORDER
    selected, pipeline = [name for name in order if name in (stages or order)], Pipeline(config)
    problems = pipeline.missing_inputs(selected)
    if not problems and any(force or not (pipeline.disabled(n) or pipeline.up_to_date(n)) for n in selected):
        local = config.eval.judge.local_model if config.eval.judge.backend == "local" else None
        models = {field: m for field, m in (("model", config.model), ("eval.judge.local_model", local)) if m}
        problems = [problem] if (problem := hub_preflight(models)) else []
    if problems:
        print(*problems, sep="\n", file=sys.stderr)
        return EXIT_STAGE_FAILED
    config.run_dir.mkdir(parents=True, exist_ok=True)  # only now: a run that never started leaves nothing
    # One driver per run dir (a second would race on .partial folders); an OS lock: a killed one never stays.
    lock = FileLock(str(config.run_dir / "driver.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"run dir {config.run_dir} is in use by another pipeline process", file=sys.stderr)
        return EXIT_STAGE_FAILED
    # SIGTERM becomes an exception: the stage's MLflow run closes as KILLED and the summary still prints.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, Terminated.on_signal) if main_thread else None
    try:
        from rich.table import Column, Table
        uri, tracker = resolve_uri(config), Tracker(config, config_path)
        try:
            if config.tracking.enabled:
                check_reachable(uri)
            tracker.start()
        except Exception as error:  # TrackingUnavailable is one line; else a store that answers but refuses
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            line = f"tracking.uri: cannot start the MLflow run on {uri}: {first}"  # auth, schema, locked db
            print(str(error) if isinstance(error, TrackingUnavailable) else line, file=sys.stderr)
            return EXIT_TRACKING
        reports, code, mlflow_status = [StageReport(name) for name in selected], 0, "FINISHED"
        for name, report in zip(selected, reports, strict=True):
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
            except (Exception, KeyboardInterrupt, Terminated) as error:
                kind = next(kind for kind in OUTCOMES if isinstance(error, kind))
                if kind is Exception:
                    traceback.print_exc()
                detail, line, code = OUTCOMES[kind]  # code: this invocation's exit status
                texts = {"error": error, "kind": type(error).__name__}
                report.status = "preempted" if kind is StagePreempted else "failed"
                report.detail = detail.format(**texts)
                mlflow_status = "FAILED" if code == EXIT_STAGE_FAILED else "KILLED"
                print(f"stage '{name}' " + line.format(**texts), file=sys.stderr)
            else:
                report.status, report.detail, report.metrics = "ran", f"{name}/", result.metrics
            report.seconds = time.perf_counter() - began
            if report.status == "ran" and name not in REPORT_THEMSELVES:
                line = f"{name}: {key_metrics(name, report.metrics)} ({report.seconds:.0f} s)"
                console.print(line, markup=False, highlight=False, soft_wrap=True)
            if mlflow_status != "FINISHED":
                break
        tracker.finish(mlflow_status)
        # The summary, one screen: what ran, how long, the outputs, how to open MLflow (unwrapped: pasteable).
        colours = {"ran": "green", "up to date": "cyan", "failed": "red", "preempted": "yellow"}
        headers = ("stage", "status", "time", "output / reason", "key metrics")
        table = Table(*(Column(header, overflow="fold") for header in headers),
                      title=f"pipeline run '{config.run.name}'", title_justify="left")  # fmt: skip
        for report in reports:
            colour = colours.get(report.status, "dim")
            table.add_row(report.name, f"[{colour}]{report.status}[/{colour}]",
                          f"{report.seconds:.1f}s" if report.seconds else "", report.detail,
                          key_metrics(report.name, report.metrics))  # fmt: skip
        console.print(table)
        tracking, parent_id = config.tracking, tracker.parent_id
        lines = [f"run dir:  {config.run_dir}",
                 "MLflow:   off (tracking.enabled: false)" if not tracking.enabled
                 else parent_id and f"MLflow:   experiment '{tracking.experiment}', parent run {parent_id}",
                 tracking.enabled and f"open UI:  {ui_command(uri)}"]  # fmt: skip
        console.print(*filter(None, lines), sep="\n", soft_wrap=True, markup=False, highlight=False)
        return code
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        lock.release()


def key_metrics(name: str, metrics: dict[str, Any]) -> str:
    """Headline numbers: the stage's ``summary(metrics)``, else ``base.*`` → ``tuned.*``, else the first 3."""
    module = stage_registry.load_stage(name)
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

