"""The 'promote' stage: log the exported model to MLflow, register a version, gate the alias.

Read top to bottom:

1. read the evaluate stage's ``results.json`` and the export stage's ``lineage.json``;
2. log the exported model(s) to the stage's MLflow run with the transformers flavor: the merged
   folder as a standalone model and/or the adapter as a PEFT model that references the local
   base (``promote.log``), with explicit pip requirements;
3. register the ``promote.register_from`` one as a new version of ``promote.registered_model``,
   tagged with the evaluation scores (``eval.*``) and lineage (``lineage.*``: parent run, data
   digests, config digest, adapter digest);
4. gate: move ``promote.alias`` (``champion``) to the new version only when ``gate_metric`` is at
   or above ``threshold`` and not worse than the current champion by more than ``margin``: with
   ``promote.gate: ci`` (the default) the lower bound of the 95% interval of (candidate -
   champion), paired over the questions both were asked (per-question results are stored with
   every version), must be above ``-margin``; before there is a champion, of (candidate - base)
   from this run's evaluation. ``--force`` overrides. The decision, its reason (quoting the
   interval) and the interval are printed, tagged on the version and the run, and written to
   ``decision.json``.

``mlflow.transformers.load_model("models:/NAME@champion")`` then loads the promoted model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pipeline.digests import digest_of
from pipeline.eval.aggregate import flatten_metrics, units
from pipeline.jsonl import read_jsonl
from pipeline.registry import (
    PER_QUESTION_TAG,
    current_holder,
    eval_tags,
    gate,
    pip_requirements,
    recorded_value,
)
from pipeline.stages.base import StageContext, StageError, StageResult

NAME = "promote"
INPUTS: tuple[str, ...] = ("evaluate", "export")
CONFIG_SECTIONS: tuple[str, ...] = ("promote",)

log = logging.getLogger(__name__)


def run(ctx: StageContext) -> StageResult:
    """Register the exported model and move the alias if the gate passes (or ``--force``)."""
    import mlflow

    cfg = ctx.config.promote
    metrics = _read_results(ctx.input_dir("evaluate") / "results.json")
    if cfg.gate_metric not in metrics:
        available = ", ".join(sorted(k for k in metrics if ".category." not in k)) or "none"
        raise StageError(
            f"promote.gate_metric: {cfg.gate_metric!r} is not in the evaluate results "
            f"(available: {available})"
        )
    rows = _read_rows(ctx.input_dir("evaluate") / "per_question.jsonl", required=cfg.gate == "ci")
    if cfg.gate == "ci" and _units(rows, cfg.gate_metric) is None:
        raise StageError(
            f"promote.gate_metric: {cfg.gate_metric!r} is not a mean over questions, which the ci gate needs "
            "(score_overall, score_turn1/2, category.<c>, exact_match, exact_match.<c>); "
            "or set promote.gate: point"
        )
    export_dir = ctx.input_dir("export")
    lineage = _read_json(export_dir / "lineage.json", "the export stage writes it")
    for kind in cfg.log:
        if not (export_dir / kind).is_dir():
            hint = " (export.mode is adapter_only?)" if kind == "merged" else ""
            raise StageError(f"promote.log: {export_dir / kind} does not exist{hint}")

    active = mlflow.active_run()
    if active is None:  # run outside the driver: open (or reopen) the stage's own run
        mlflow.start_run(run_id=ctx.mlflow_run_id, run_name=None if ctx.mlflow_run_id else NAME)
    try:
        return _promote(ctx, metrics, lineage, export_dir, rows)
    finally:
        if active is None:
            mlflow.end_run()


def _promote(
    ctx: StageContext,
    metrics: dict[str, float | None],
    lineage: dict[str, Any],
    export_dir: Path,
    rows: list[dict[str, Any]] | None,
) -> StageResult:
    import mlflow

    cfg = ctx.config.promote
    client = mlflow.MlflowClient()
    run = mlflow.active_run()
    run_id = run.info.run_id
    parent_run_id = mlflow.get_run(run_id).data.tags.get("mlflow.parentRunId")

    logged = {kind: _log_model(ctx, export_dir, kind, lineage) for kind in cfg.log}
    tags = {
        **eval_tags(metrics),
        "lineage.run_id": run_id,
        "lineage.parent_run_id": str(parent_run_id),
        "lineage.export_run_id": str(lineage.get("mlflow_run_id")),
        "lineage.config_digest": digest_of(ctx.config.model_dump(mode="json")),  # the parent run's tag
        "lineage.adapter_digest": str(lineage.get("adapter_digest")),
        "lineage.base_model": str(lineage.get("base_model")),
        "lineage.method": str(lineage.get("method")),
        "lineage.artifact": cfg.register_from,
        **{f"lineage.data_digest.{k}": v for k, v in lineage.get("data_digests", {}).items()},
    }
    if rows is not None:  # the next candidate's gate pairs its questions with these
        mlflow.log_artifact(str(ctx.input_dir("evaluate") / "per_question.jsonl"), artifact_path="evaluation")
        tags[PER_QUESTION_TAG] = f"runs:/{run_id}/evaluation/per_question.jsonl"
    holder = current_holder(client, cfg.registered_model, cfg.alias)
    version = mlflow.register_model(logged[cfg.register_from], cfg.registered_model, tags=tags)

    champion_value = recorded_value(holder, cfg.gate_metric)
    decision = gate(
        metric=cfg.gate_metric,
        value=metrics.get(cfg.gate_metric),
        threshold=cfg.threshold,
        margin=cfg.margin,
        champion_version=holder.version if holder is not None else None,
        champion_value=champion_value,
        force=ctx.force,
        mode=cfg.gate,
        interval=gate_interval(rows, cfg.gate_metric, holder, champion_value, metrics)
        if cfg.gate == "ci"
        else None,
    )
    if decision.promote:
        client.set_registered_model_alias(cfg.registered_model, cfg.alias, version.version)
    for key, value in decision.as_tags().items():
        client.set_model_version_tag(cfg.registered_model, version.version, key, value)
    mlflow.set_tags({**decision.as_tags(), "promotion.version": version.version})

    verdict = "promoted to" if decision.promote else "not promoted to"
    message = (
        f"promote: {cfg.registered_model} version {version.version} {verdict} @{cfg.alias}: {decision.reason}"
    )
    print(message)
    log.info(message)

    record = {
        "registered_model": cfg.registered_model,
        "version": version.version,
        "alias": cfg.alias,
        "logged_models": logged,
        **decision.as_dict(),
    }
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    (ctx.work_dir / "decision.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return StageResult(
        metrics={"version": float(version.version), "promoted": float(decision.promote)},
        outputs={"decision": "decision.json"},
        extra=record,
    )


def _log_model(ctx: StageContext, export_dir: Path, kind: str, lineage: dict[str, Any]) -> str:
    """Log one exported artifact with the transformers flavor; returns its model URI.

    Model objects, not a folder path, are passed: transformers 5 models are logged reliably that
    way, and the adapter needs its base model object anyway."""
    import mlflow
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if kind == "merged":
        folder = export_dir / "merged"
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        extra: dict[str, Any] = {}
    else:
        from peft import PeftModel

        from pipeline.models import load_model, resolve_model_dir

        if lineage.get("method") == "uora":
            import uora  # noqa: F401  (registers UORA with PEFT)
        folder = export_dir / "adapter"
        base = load_model(ctx.config.model.model_copy(update={"load_in_8bit": False}), quantize=False)
        model = PeftModel.from_pretrained(base, str(folder))
        tokenizer = AutoTokenizer.from_pretrained(folder)
        # The base weights are referenced, not copied: the adapter is the small artifact.
        extra = {"base_model_path": resolve_model_dir(ctx.config.model)}
    from huggingface_hub import ModelCard

    # Export's card (base model, licence, lineage): without one, MLflow looks the local folder up on
    # the hub for a card and a licence, and warns twice.
    card = ModelCard.load(folder / "README.md") if (folder / "README.md").is_file() else None
    with torch.no_grad():
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            name=kind,
            task="text-generation",
            pip_requirements=pip_requirements(peft=kind == "adapter"),
            model_card=card,
            **extra,
        )
    return info.model_uri


def gate_interval(
    rows: list[dict[str, Any]],
    metric: str,
    holder: Any | None,
    champion_value: float | None,
    metrics: dict[str, float | None],
) -> dict[str, Any] | None:
    """The ci gate's evidence: candidate - champion on ``metric``, paired over the questions both
    were asked (matched by content); unpaired when they share none; the candidate's own interval
    minus the champion's recorded value when the champion has no per-question results; candidate -
    base from this run's rows before there is a champion. None when there is nothing to compare."""
    from pipeline.eval.stats import compare, interval, verdict

    candidate = _units(rows, metric)
    model, _, name = metric.partition(".")
    if holder is None:
        base = _units(rows, f"base.{name}") if model != "base" else None
        found = compare(base, candidate) if base and candidate else None
        return found and {**found, "against": "base (no champion yet)", "paired": True, "note": None}
    against, note = f"champion (version {holder.version})", None
    champion_rows = _champion_rows(holder)
    if champion_rows is None:
        own, value = interval(candidate or {}), metrics.get(metric)
        if own is None or champion_value is None or value is None:
            return None
        note = (
            f"champion version {holder.version} has no per-question results (registered before they were "
            f"stored): the candidate's own interval minus the champion's recorded {metric}"
        )
        ci95 = [round(bound - champion_value, 4) for bound in own]
        found = {"diff": round(value - champion_value, 4), "ci95": ci95, "n": len(candidate or {}),
                 "verdict": verdict(ci95)}  # fmt: skip
    else:
        champion = _units(champion_rows, metric) or {}
        found = compare(champion, candidate or {})
        if found is None:
            note = f"too few questions shared with champion version {holder.version}: unpaired intervals"
            found = compare(champion, candidate or {}, paired=False)
    if note:
        log.warning("promote: %s", note)
    return found and {**found, "against": against, "paired": note is None, "note": note}


def _units(rows: list[dict[str, Any]] | None, metric: str) -> Any:
    model, _, name = metric.partition(".")
    return None if rows is None else units(rows, model, name)


def _champion_rows(holder: Any) -> list[dict[str, Any]] | None:
    """The champion's stored per-question results, or None (registered before they were stored,
    or the artifact is gone)."""
    import tempfile

    import mlflow

    uri = (holder.tags or {}).get(PER_QUESTION_TAG)
    if not uri:
        return None
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=folder)
        except Exception as error:  # a deleted run or artifact store: compare as if it had none
            log.warning("promote: cannot read the champion's per-question results at %s: %s", uri, error)
            return None
        return _read_rows(Path(path), required=True)


def _read_rows(path: Path, required: bool) -> list[dict[str, Any]] | None:
    if not path.is_file():
        if required:
            raise StageError(
                f"promote: {path} is missing (re-run evaluate, which writes it, or set promote.gate: point)"
            )
        return None
    return [row for _, row in read_jsonl(path, "promote")]


def _read_results(path: Path) -> dict[str, float | None]:
    results = _read_json(path, "the evaluate stage writes it")
    if not isinstance(results.get("models"), dict):
        raise StageError(f"promote: {path} has no 'models' object")
    return flatten_metrics(results["models"], keep_none=True)  # None kept: the gate names a null score


def _read_json(path: Path, hint: str) -> dict[str, Any]:
    if not path.is_file():
        raise StageError(f"promote: {path} is missing ({hint})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise StageError(f"promote: {path} is not valid JSON: {error}") from error
