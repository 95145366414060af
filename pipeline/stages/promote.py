"""The 'promote' stage: log the exported model(s) to MLflow, register a version tagged with scores, lineage
and per-question results, and move ``models:/NAME@champion`` if the pure (MLflow-free) ``gate`` passes."""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.digests import digest_of
from pipeline.eval import stats
from pipeline.eval.aggregate import flatten_metrics, units
from pipeline.jsonl import read_jsonl
from pipeline.models import load_model, resolve_model_dir
from pipeline.stages.base import StageContext, StageError, StageResult

NAME = "promote"
INPUTS: tuple[str, ...] = ("evaluate", "export")
CONFIG_SECTIONS: tuple[str, ...] = ("promote",)
PER_QUESTION_TAG = "evaluation.per_question"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateDecision:
    """Whether a candidate version takes the alias, and why (recorded verbatim as tags)."""
    promote: bool
    reason: str
    forced: bool
    metric: str
    value: float | None
    champion_version: str | None
    champion_value: float | None
    gate: str = "point"
    interval: dict[str, Any] | None = None  # the ci gate's: diff, ci95, n, against, paired, note

    def as_tags(self) -> dict[str, str]:
        return {"promotion.decision": "promoted" if self.promote else "refused", "promotion.gate": self.gate,
                "promotion.reason": self.reason, "promotion.forced": str(self.forced).lower()}  # fmt: skip


def gate(*, metric: str, value: float | None, threshold: float | None, margin: float,
         champion_version: str | None, champion_value: float | None, force: bool = False,
         mode: str = "point", interval: dict[str, Any] | None = None) -> GateDecision:  # fmt: skip
    """The promotion rule: ``value`` (higher is better) present, at or above any ``threshold``, not below
    the champion's by more than ``margin`` (a champion without a recorded value is kept); ``mode="ci"``:
    the ``interval`` of candidate - champion (or - base) has a lower bound > ``-margin``. ``force`` wins."""
    if value is None:
        ok, reason = False, f"{metric} is missing from the evaluation results (null)"
    elif threshold is not None and value < threshold:
        ok, reason = False, f"{metric}={value:g} is below the threshold {threshold:g}"
    elif mode == "ci" and interval is not None:
        low, high = interval["ci95"]
        ok, kind = low > -margin, "shared" if interval["paired"] else "(unpaired)"
        note = f"{interval['note']}; " if interval.get("note") else ""
        reason = (f"{note}{metric}: candidate - {interval['against']} = {interval['diff']:+.4g}, 95% "
                  f"interval [{low:+.4g}, {high:+.4g}] over {interval['n']} {kind} questions; its lower "
                  f"bound is {'' if ok else 'not '}above -margin ({-margin or 0.0:g})")  # fmt: skip
    elif champion_version is None:
        floor = f" and meets the threshold {threshold:g}" if threshold is not None else ""
        ok, reason = True, f"no current champion; {metric}={value:g}{floor}"
    elif champion_value is None:
        ok = False
        reason = f"the current champion (version {champion_version}) has no recorded {metric} to compare with"
    else:
        ok = not value < champion_value - margin
        champion = f"the champion's {champion_value:g} (version {champion_version})"
        reason = f"{metric}={value:g} " + (
            f"is within the margin {margin:g} of or better than {champion}" if ok
            else f"is worse than {champion} by more than the margin {margin:g}")  # fmt: skip
    if force:
        reason, ok = f"forced with --force (gate {'passed' if ok else 'failed'}: {reason})", True
    return GateDecision(ok, reason, force, metric, value, champion_version, champion_value, mode, interval)


def pip_requirements(*, peft: bool) -> list[str]:
    """Explicit requirements for a logged model: MLflow would infer them, torchvision included."""
    names = ["transformers", "torch", "accelerate", "safetensors", "tokenizers"] + (["peft"] if peft else [])
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in names]  # local tags (+cpu) dropped


def run(ctx: StageContext) -> StageResult:
    """Register the exported model and move the alias if the gate passes (or ``--force``)."""
    import mlflow

    cfg, evaluated = ctx.config.promote, ctx.input_dir("evaluate")
    results = _read_json(evaluated / "results.json", "the evaluate stage writes it")
    if not isinstance(results.get("models"), dict):
        raise StageError(f"promote: {evaluated / 'results.json'} has no 'models' object")
    metrics = flatten_metrics(results["models"], keep_none=True)  # None kept: the gate names a null score
    if cfg.gate_metric not in metrics:
        available = ", ".join(sorted(k for k in metrics if ".category." not in k)) or "none"
        raise StageError(f"promote.gate_metric: {cfg.gate_metric!r} is not in the evaluate results "
                         f"(available: {available})")  # fmt: skip
    per_question = evaluated / "per_question.jsonl"
    if cfg.gate == "ci" and not per_question.is_file():
        raise StageError(f"promote: {per_question} is missing (re-run evaluate, which writes it, or set "
                         "promote.gate: point)")  # fmt: skip
    rows = [row for _, row in read_jsonl(per_question, "promote")] if per_question.is_file() else None
    if cfg.gate == "ci" and units(rows, *cfg.gate_metric.split(".", 1)) is None:
        raise StageError(f"promote.gate_metric: {cfg.gate_metric!r} is not a mean over questions, which the "
                         "ci gate needs (score_overall, score_turn1/2, category.<c>, exact_match, "
                         "exact_match.<c>); or set promote.gate: point")  # fmt: skip
    export_dir = ctx.input_dir("export")
    lineage = _read_json(export_dir / "lineage.json", "the export stage writes it")
    for kind in cfg.log:
        if not (export_dir / kind).is_dir():
            hint = " (export.mode is adapter_only?)" if kind == "merged" else ""
            raise StageError(f"promote.log: {export_dir / kind} does not exist{hint}")

    with contextlib.ExitStack() as own_run:
        if mlflow.active_run() is None:  # run outside the driver: open (or reopen) the stage's own run
            mlflow.start_run(run_id=ctx.mlflow_run_id, run_name=None if ctx.mlflow_run_id else NAME)
            own_run.callback(mlflow.end_run)
        client, run_id = mlflow.MlflowClient(), mlflow.active_run().info.run_id
        logged = {kind: _log_model(ctx, export_dir, kind) for kind in cfg.log}
        tags = {f"eval.{name}": str(value) for name, value in metrics.items() if value is not None} | {
            "lineage.run_id": run_id, "lineage.export_run_id": str(lineage.get("mlflow_run_id")),
            "lineage.parent_run_id": str(mlflow.get_run(run_id).data.tags.get("mlflow.parentRunId")),
            "lineage.config_digest": digest_of(ctx.config.model_dump(mode="json")),  # the parent run's tag
            **{f"lineage.{key}": str(lineage.get(key)) for key in ("adapter_digest", "base_model", "method")},
            "lineage.artifact": cfg.register_from,
            **{f"lineage.data_digest.{k}": v for k, v in lineage.get("data_digests", {}).items()}}
        if rows is not None:  # the next candidate's gate pairs its questions with these
            mlflow.log_artifact(str(per_question), artifact_path="evaluation")
            tags[PER_QUESTION_TAG] = f"runs:/{run_id}/evaluation/per_question.jsonl"
        version = mlflow.register_model(logged[cfg.register_from], cfg.registered_model, tags=tags)
        held = client.get_registered_model(cfg.registered_model).aliases.get(cfg.alias)  # the champion's
        holder = client.get_model_version(cfg.registered_model, held) if held else None
        champion_value = None  # the gate metric recorded on the champion at its registration, if any
        with contextlib.suppress(AttributeError, TypeError, ValueError):  # no champion, none recorded
            champion_value = float((holder.tags or {}).get(f"eval.{cfg.gate_metric}"))
        evidence = (gate_interval(rows, cfg.gate_metric, holder, champion_value, metrics[cfg.gate_metric])
                    if cfg.gate == "ci" else None)  # fmt: skip
        decision = gate(metric=cfg.gate_metric, value=metrics[cfg.gate_metric], threshold=cfg.threshold,
                        margin=cfg.margin, champion_version=holder.version if holder is not None else None,
                        champion_value=champion_value, force=ctx.force, mode=cfg.gate, interval=evidence)
        if decision.promote:
            client.set_registered_model_alias(cfg.registered_model, cfg.alias, version.version)
        for key, value in decision.as_tags().items():
            client.set_model_version_tag(cfg.registered_model, version.version, key, value)
        mlflow.set_tags({**decision.as_tags(), "promotion.version": version.version})
    message = (f"promote: {cfg.registered_model} version {version.version} "
               f"{'' if decision.promote else 'not '}promoted to @{cfg.alias}: {decision.reason}")
    print(message)
    log.info(message)
    record = {"registered_model": cfg.registered_model, "version": version.version, "alias": cfg.alias,
              "logged_models": logged, **asdict(decision)}  # fmt: skip
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    (ctx.work_dir / "decision.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return StageResult(metrics={"version": float(version.version), "promoted": float(decision.promote)},
                       outputs={"decision": "decision.json"}, extra=record)  # fmt: skip


def _log_model(ctx: StageContext, export_dir: Path, kind: str) -> str:
    """Log one exported artifact with the transformers flavor; returns its model URI. Model objects,
    not a folder: transformers 5 models log reliably that way, and the adapter needs its base's."""
    import mlflow
    import torch
    from huggingface_hub import ModelCard
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import uora  # noqa: F401  (registers UORA with PEFT)

    folder = export_dir / kind
    if kind == "merged":
        model, extra = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", use_safetensors=True), {}
    else:  # the base weights are referenced, not copied: the adapter is the small artifact
        model = PeftModel.from_pretrained(load_model(ctx.config.model, quantize=False), str(folder))
        extra = {"base_model_path": resolve_model_dir(ctx.config.model)}
    # Export's card (base model, licence, lineage): else MLflow looks for one on the hub, and warns twice.
    card = ModelCard.load(folder / "README.md") if (folder / "README.md").is_file() else None
    with torch.no_grad():
        return mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": AutoTokenizer.from_pretrained(folder)},
            name=kind, task="text-generation", pip_requirements=pip_requirements(peft=kind == "adapter"),
            model_card=card, **extra).model_uri  # fmt: skip


def gate_interval(rows: list[dict[str, Any]], metric: str, holder: Any | None, champion_value: float | None,
                  value: float | None) -> dict[str, Any] | None:  # fmt: skip
    """The ci gate's evidence (None if nothing compares): candidate - champion, or - base before one."""
    import mlflow

    model, name = metric.split(".", 1)
    candidate = units(rows, model, name)
    if holder is None:
        base = units(rows, "base", name) if model != "base" else None
        found = stats.compare(base, candidate) if base else None
        return found and {**found, "against": "base (no champion yet)", "paired": True, "note": None}
    against, champion_rows = f"champion (version {holder.version})", None
    if uri := (holder.tags or {}).get(PER_QUESTION_TAG):  # absent: registered before they were stored
        try:
            lines = mlflow.artifacts.load_text(uri).splitlines()
            champion_rows = [json.loads(line) for line in lines if line.strip()]
        except Exception as error:  # a deleted run or artifact store: compare as if it had none
            log.warning("promote: cannot read the champion's per-question results at %s: %s", uri, error)
    if champion_rows is not None:
        champion, note = units(champion_rows, model, name), None
        if (found := stats.compare(champion, candidate)) is None:
            note = f"too few questions shared with champion version {holder.version}: unpaired intervals"
            found = stats.compare(champion, candidate, paired=False)
    elif (own := stats.interval(candidate)) is None or champion_value is None or value is None:
        return None
    else:
        note = (f"champion version {holder.version} has no per-question results (registered before they "
                f"were stored): the candidate's own interval minus the champion's recorded {metric}")
        ci95 = [round(bound - champion_value, 4) for bound in own]
        found = {"diff": round(value - champion_value, 4), "ci95": ci95, "n": len(candidate),
                 "verdict": stats.verdict(ci95)}  # fmt: skip
    if note:
        log.warning("promote: %s", note)
    return found and {**found, "against": against, "paired": not note, "note": note}


def _read_json(path: Path, hint: str) -> dict[str, Any]:
    if not path.is_file():
        raise StageError(f"promote: {path} is missing ({hint})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise StageError(f"promote: {path} is not valid JSON: {error}") from error
