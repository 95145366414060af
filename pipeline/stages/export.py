"""The 'export' stage: the adapter, and a merged model that plain ``transformers`` must reload with base +
adapter's logits within the dtype's tolerance (else no ``merged/``). Cards hold no scores (re-judging would
outdate an unchanged multi-GB model): they are in evaluate's MLflow run and promote's ``eval.*`` tags."""

from __future__ import annotations

import gc
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from pipeline.adapters import DEFAULT_TOLERANCE, compare_logits, logits_of, verification_inputs
from pipeline.digests import folder_digest
from pipeline.models import base_model_card
from pipeline.stages.base import StageContext, StageError, StageResult

NAME = "export"
INPUTS: tuple[str, ...] = ("train",)
CONFIG_SECTIONS: tuple[str, ...] = ("model", "export")

log = logging.getLogger(__name__)


def run(ctx: StageContext) -> StageResult:
    """Export the trained adapter: adapter copy, verified merged model, model card, lineage."""
    from pipeline.tracking import active_mlflow

    final_dir = ctx.run_dir / NAME
    if final_dir.exists() and any(final_dir.iterdir()) and not ctx.force:
        raise StageError(f"export: {final_dir} already exists; pass --force to overwrite it")
    source = ctx.input_dir("train") / "adapter"
    config_path = source / "adapter_config.json"
    for path, why in ((config_path, "the train stage writes it"),
                      (source / "adapter_model.safetensors", "safetensors only")):  # fmt: skip
        if not path.is_file():
            raise StageError(f"export: {path} is missing ({why})")
    try:
        adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise StageError(f"export: {config_path} is not valid JSON: {error}") from error
    method, work = str(adapter_config.get("peft_type", "?")).lower(), ctx.work_dir
    shutil.rmtree(work, ignore_errors=True)  # an interrupted attempt's leftovers are never trusted
    shutil.copytree(source, work / "adapter")
    mlflow = active_mlflow()  # the stage's child run (ctx.mlflow_run_id), if tracking is on
    parent_run = mlflow and ctx.mlflow_run_id and mlflow.active_run().data.tags.get("mlflow.parentRunId")
    lineage = {
        "adapter_digest": folder_digest(source), "data_digests": data_digests(ctx.run_dir),
        "base_model": ctx.config.model.name_or_path, "base_gguf_file": ctx.config.model.gguf_file,
        "base_card": base_model_card(ctx.config.model), "method": method, "r": adapter_config.get("r"),
        "mlflow_run_id": ctx.mlflow_run_id, "mlflow_parent_run_id": parent_run,
    }  # fmt: skip
    outputs, metrics, report = {"adapter": "adapter", "lineage": "lineage.json"}, {}, None
    extra: dict[str, Any] = {"method": method, "mode": ctx.config.export.mode}
    if ctx.config.export.mode == "merged":
        report = extra["verification"] = _merge_verify_save(ctx, source, work, lineage)
        metrics = {f"verify_{k}": report[k] for k in ("max_abs_error", "rel_error", "top1_agreement")}
        metrics["trainable_params"] = float(report["trainable_params"])
        outputs.update({"merged": "merged", "verification": "verification.json"})
    # PEFT's save_pretrained left its empty template (and a local path as base_model) here.
    (work / "adapter" / "README.md").write_text(model_card(ctx, lineage, report, "adapter"), encoding="utf-8")
    (work / "lineage.json").write_text(json.dumps(lineage, indent=2) + "\n", encoding="utf-8")
    if mlflow is not None:  # metrics: the driver logs the StageResult's (once)
        for name, folder in (("verification.json", None), ("lineage.json", None),
                             ("merged/README.md", "model_card")):  # fmt: skip
            if (work / name).is_file():
                mlflow.log_artifact(str(work / name), artifact_path=folder)
    return StageResult(metrics=metrics, outputs=outputs, extra=extra)


def summary(metrics: dict[str, float]) -> str:
    """The stage's result line."""
    return (f"merged model verified: relative logit error {metrics['verify_rel_error']:.2g}, top-1 agreement "
            f"{metrics['verify_top1_agreement']:.3f}" if "verify_rel_error" in metrics
            else "adapter copied (export.mode: adapter_only)")  # fmt: skip


def _merge_verify_save(ctx: StageContext, source: Path, work: Path, lineage: dict[str, Any]) -> dict:
    """Merge into a float base, save to ``merged.tmp``, verify from disk, then rename to ``merged``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import uora  # noqa: F401  (registers UORA with PEFT, so a UORA adapter loads)
    from pipeline.models import load_model, load_tokenizer

    cfg, eight_bit = ctx.config.export, ctx.config.model.load_in_8bit
    dtype_name = cfg.dtype or ctx.config.model.dtype
    dtype = getattr(torch, dtype_name)
    tolerance = cfg.tolerance if cfg.tolerance is not None else DEFAULT_TOLERANCE[dtype_name]
    if eight_bit:
        log.warning("export: training used an 8-bit base (model.load_in_8bit); reloading the base "
                    "unquantised in %s for the merge, since merging into int8 weights discards most of "
                    "the adapter's update", dtype_name)  # fmt: skip
    if (source / "tokenizer_config.json").is_file():  # saved beside the adapter: the training chat template
        tokenizer = AutoTokenizer.from_pretrained(str(source))
    else:
        log.warning("export: %s has no tokenizer; using the base model's", source)
        tokenizer = load_tokenizer(ctx.config.model)
    # Unquantised, in the dtype we ship, then merged and verified in float32 (an exact upcast): the shipped
    # weights are rounded once, at save, and the check measures that rounding, not half-precision compute.
    base = load_model(ctx.config.model.model_copy(update={"dtype": dtype_name}), quantize=False)
    model = PeftModel.from_pretrained(base.float(), str(source), is_trainable=True).eval()
    trainable, total = model.get_nb_trainable_parameters()
    prompts = verification_inputs(tokenizer, cfg.verify_prompts, cfg.verify_max_tokens)
    reference = logits_of(model, prompts)
    with model.disable_adapter():  # how far the adapter moves the base: the check's resolution
        adapter_effect = compare_logits(reference, logits_of(model, prompts))["rel_error"]
    merged = model.merge_and_unload().to(dtype)
    staging = work / "merged.tmp"
    merged.save_pretrained(staging, max_shard_size=cfg.max_shard_size, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    del model, merged, base
    gc.collect()
    try:
        reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=dtype, use_safetensors=True)
        report = compare_logits(reference, logits_of(reloaded.float().eval(), prompts))
        del reloaded
        report.update(dtype=dtype_name, tolerance=tolerance, prompts=len(prompts),
                      passed=report["rel_error"] <= tolerance, adapter_effect_rel=adapter_effect,
                      trainable_params=int(trainable), total_params=int(total),
                      merged_from_8bit_training=eight_bit)  # fmt: skip
        if adapter_effect <= tolerance:
            log.warning("export: the adapter changes the logits by only %.3g (relative), within the "
                        "verification tolerance %g: the check cannot tell a merged from an unmerged model",
                        adapter_effect, tolerance)  # fmt: skip
        (work / "verification.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        if not report["passed"]:
            raise StageError(f"export: verification failed: merged logits differ from base + adapter by "
                             f"{report['rel_error']:.3g} (relative; max |Δ| {report['max_abs_error']:.3g}) > "
                             f"tolerance {tolerance:g} for {dtype_name}")  # fmt: skip
        lineage["trainable_params"] = int(trainable)
        (staging / "README.md").write_text(model_card(ctx, lineage, report, "merged"), encoding="utf-8")
        staging.rename(work / "merged")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("export: merged model verified (relative error %.3g, top-1 agreement %.3f) -> %s",
             report["rel_error"], report["top1_agreement"], work / "merged")  # fmt: skip
    return report


def model_card(ctx: StageContext, lineage: dict[str, Any], report: dict[str, Any] | None, kind: str) -> str:
    """The Hugging Face card of ``merged/`` or ``adapter/``, rendered from ``builtin/model_card.md.jinja``."""
    import jinja2

    text = (Path(__file__).parents[1] / "builtin" / "model_card.md.jinja").read_text(encoding="utf-8")
    template = jinja2.Template(text, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    return template.render(lineage=lineage, report=report, merged=kind == "merged", model=ctx.config.model,
                           run_name=ctx.config.run.name)  # fmt: skip


def data_digests(run_dir: Path) -> dict[str, str]:
    """sha256 of the prepared dataset folder (content of every file, in path order), if present."""
    dataset = run_dir / "prepare" / "dataset"
    return {"prepare/dataset": folder_digest(dataset)} if dataset.is_dir() else {}

