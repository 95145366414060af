"""The 'evaluate' stage (MT-Bench's recipe): base and tuned answer ``eval.questions`` and held-out rows, a
judge grades them; scores get 95% bootstrap intervals and paired tuned-base diffs. Caches: reruns resume."""

from __future__ import annotations

import gc
import json
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.adapters import DEFAULT_TOLERANCE, compare_logits, logits_of, verification_inputs
from pipeline.config import PipelineConfig
from pipeline.eval import aggregate
from pipeline.eval.generate import GenerationSettings, generate_answers
from pipeline.eval.identity import model_identity, weights_digest
from pipeline.eval.judging import build_pair_tasks, build_tasks, pair_outcomes, run_judging
from pipeline.eval.prompts import load_prompts
from pipeline.eval.questions import Question, is_verifiable, load_heldout_questions, load_questions
from pipeline.models import load_model, load_tokenizer
from pipeline.stages.base import StageContext, StageError, StageResult
from pipeline.tracking import active_mlflow, metric_name

NAME = "evaluate"
INPUTS: tuple[str, ...] = ("prepare", "train")
CONFIG_SECTIONS: tuple[str, ...] = ("run.seed", "model", "eval")  # generation is seeded by run.seed
OUTPUTS = {"results": "results.json", "table": "results.md", "radar": "radar.png",  # each if written
           "per_question": "per_question.jsonl", "comparisons_plot": "comparisons.png", "answers": "answers",
           "judgments": "judgments"}  # fmt: skip

log = logging.getLogger(__name__)


def inputs(config: PipelineConfig) -> tuple[str, ...]:
    """``INPUTS`` under this config: the base alone (or a ``tuned_path`` folder) needs no train stage."""
    return INPUTS if "tuned" in config.eval.models and not config.eval.tuned_path else ("prepare",)


def run(ctx: StageContext) -> StageResult:
    cfg, work = ctx.config.eval, ctx.work_dir
    work.mkdir(parents=True, exist_ok=True)
    if not ctx.force:  # start from the last completed evaluation's caches: their keys say what still holds
        for path in (ctx.run_dir / NAME).glob("*/*.jsonl"):  # answers/ and judgments/
            if not (target := work / path.relative_to(ctx.run_dir / NAME)).exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)

    questions, heldout = all_questions(ctx)  # what can be wrong with the inputs fails before a model loads
    prompts = load_prompts(cfg.judge.prompts, cfg.judge.mode)
    from pipeline.judges import LocalJudge, OpenAIJudge  # an HTTP judge checks that its key's env var is set

    http_judge = OpenAIJudge.from_config(cfg.judge) if cfg.judge.backend == "openai" else None
    tuned_path = None
    if "tuned" in cfg.models:  # eval.tuned_path (an adapter or merged folder) or the train stage's adapter
        tuned_path = Path(cfg.tuned_path) if cfg.tuned_path else ctx.input_dir("train") / "adapter"
        if cfg.tuned_path and not tuned_path.is_dir():
            raise StageError(f"eval.tuned_path: {tuned_path} is not a directory")
        if not cfg.tuned_path and not (tuned_path / "adapter_config.json").is_file():
            raise StageError(f"stage input missing: {tuned_path}/adapter_config.json "
                             "(run the 'train' stage first)")
    # Verifiable questions (every turn has an exact answer) may skip the judge: exact match scores them.
    judged = questions if cfg.judge_verifiable else [q for q in questions if not is_verifiable(q)]
    log.info("evaluate: %d questions (%d held-out, %d to the judge), models %s",
             len(questions), len(heldout), len(judged), ", ".join(cfg.models))  # fmt: skip

    answers = generate_all(ctx.config, questions, work / "answers", tuned_path, greedy=heldout)

    found: dict[str, list[dict[str, Any]]] = {"single": [], "pairwise": []}
    if judged:
        judge = http_judge or LocalJudge.from_config(cfg.judge, ctx.config.model, seed=ctx.config.run.seed)
        for mode, build in (("single", build_tasks), ("pairwise", build_pair_tasks)):
            if cfg.judge.mode in (mode, "both"):
                tasks = build(judged, answers, prompts, judge.identity(), cfg.judge.samples)
                cache = work / "judgments" / f"{mode}.jsonl"
                found[mode] = run_judging(judge, tasks, cache, cfg.judge.samples, pairwise=mode == "pairwise")
        del judge
        gc.collect()

    outcomes, failures = pair_outcomes(found["pairwise"])  # failures: turns with no readable verdict
    rows = aggregate.per_question(questions, answers, found["single"], outcomes, judged_questions=judged)
    models = aggregate.aggregate(questions, answers, found["single"], judged_questions=judged)
    results = {"models": aggregate.with_intervals(models, rows),
               "comparisons": aggregate.comparisons(models, rows),
               "pairwise": aggregate.pairwise_summary(rows, failures), "judge": judge_summary(ctx.config),
               "questions": {"source": cfg.questions, "count": len(questions),
                             "categories": sorted({q.category for q in questions}), "heldout": len(heldout),
                             "heldout_sources": sorted({q.category for q in heldout}), "judged": len(judged)}}
    metrics = aggregate.flatten_metrics(results["models"])  # the driver logs these to this stage's MLflow run
    for name, diff in results["comparisons"].get("tuned-base", {}).items():
        prefix, (low, high) = metric_name(f"tuned-base.{name}"), diff["ci95"]
        metrics |= {f"{prefix}.diff": diff["diff"], f"{prefix}.ci95_low": low, f"{prefix}.ci95_high": high}
    return StageResult(metrics=metrics, outputs=write_results(work, results, rows),
                       extra={"questions": len(questions), "judge": results["judge"]})  # fmt: skip


def all_questions(ctx: StageContext) -> tuple[list[Question], list[Question]]:
    """(all, held-out): ``eval.questions`` (generated: no trained user message), then eval-split rows."""
    cfg, dataset_dir = ctx.config.eval, ctx.run_dir / "prepare" / "dataset"
    trained: list[str] = []
    if dataset_dir.is_dir():
        from datasets import load_from_disk

        train = load_from_disk(str(dataset_dir))["train"]
        trained = [m["content"] for messages in train["messages"] for m in messages if m["role"] == "user"]
    questions = load_questions(cfg, exclude_instructions=trained)
    heldout = load_heldout_questions(dataset_dir, cfg.heldout_questions, cfg.heldout_sources)
    if heldout and len(heldout) < cfg.heldout_questions:
        log.warning("eval.heldout_questions: %d asked for, the eval split has %d eligible rows",
                    cfg.heldout_questions, len(heldout))  # fmt: skip
    taken = {str(q.question_id) for q in questions}
    if clash := [q.question_id for q in heldout if str(q.question_id) in taken]:
        raise StageError(f"eval.heldout_questions: question ids {clash} already used by eval.questions")
    return questions + heldout, heldout


def generation_settings(config: PipelineConfig, greedy: Iterable[Question] = ()) -> GenerationSettings:
    """Sampling settings; ``greedy`` questions' categories at temperature 0 (exact match: no sample luck)."""
    same = {"max_new_tokens", "batch_size", "default_temperature", "verifiable_max_new_tokens"}  # same names
    return GenerationSettings(**config.eval.model_dump(include=same), seed=config.run.seed,
                              temperatures={q.category: 0.0 for q in greedy} | config.eval.temperatures)


def generate_all(config: PipelineConfig, questions: list[Question], answers_dir: Path,
                 tuned_path: Path | None, greedy: Iterable[Question] = ()) -> dict[str, dict[str, Any]]:
    """Base's, then tuned's answers (cached): one base model answers, then carries any adapter for tuned."""
    import torch

    settings, base_identity = generation_settings(config, greedy), model_identity(config.model)
    device_map = "auto" if torch.cuda.is_available() else None
    adapter = tuned_path is not None and (tuned_path / "adapter_config.json").is_file()
    folder = {"name_or_path": str(tuned_path), "gguf_file": None, "revision": None}  # as a model config
    answers: dict[str, dict[str, dict[str, Any]]] = {}

    def answer(name: str, model: Any, tokenizer: Any, identity: str) -> None:
        answers[name] = generate_answers(model, tokenizer, questions, settings, model_id=name,
                                         model_identity=identity, cache_path=answers_dir / f"{name}.jsonl")

    base = "base" in config.eval.models
    model = load_model(config.model, device_map=device_map).eval() if base or adapter else None
    if base:
        answer("base", model, load_tokenizer(config.model), base_identity)
    if adapter:
        own = config.model.model_copy(update=folder | {"chat_template": None, "trust_remote_code": False})
        tokenizer = load_tokenizer(own if (tuned_path / "tokenizer_config.json").is_file() else config.model)
        model, merged = merge_verified(attach_adapter(model, tuned_path), tokenizer, config)
        suffix = f"+adapter:{weights_digest(tuned_path)}" + ("+merged" if merged else "")
        answer("tuned", model, tokenizer, base_identity + suffix)
    elif tuned_path is not None:
        del model
        gc.collect()
        merged_cfg = config.model.model_copy(update=folder)
        model = load_model(merged_cfg, device_map=device_map).eval()
        answer("tuned", model, load_tokenizer(merged_cfg), f"merged:{weights_digest(tuned_path)}")
    del model
    gc.collect()
    return answers


def attach_adapter(model: Any, adapter_dir: Path) -> Any:
    """``model`` with the PEFT adapter in ``adapter_dir`` on top, unmerged (as it was trained)."""
    from peft import PeftModel

    import uora  # noqa: F401  (registers UORA with PEFT)

    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False).eval()


def merge_verified(model: Any, tokenizer: Any, config: PipelineConfig) -> tuple[Any, bool]:
    """The adapter merged into the base (generation then costs the base's) if the merged logits match the
    unmerged on export's prompts and tolerance; an 8-bit base stays unmerged (int8 loses low-rank updates)."""
    if config.model.load_in_8bit:
        log.info("evaluate: 8-bit base; the tuned model answers unmerged (no merge into int8 weights)")
        return model, False
    reference = logits_of(model, prompts := verification_inputs(tokenizer, 4, 96))
    model.merge_adapter()
    error = compare_logits(reference, logits_of(model, prompts))["rel_error"]
    if error > (tolerance := DEFAULT_TOLERANCE[config.model.dtype]):
        model.unmerge_adapter()
        log.warning("evaluate: merged logits differ by %.3g (> %g); the tuned model answers unmerged",
                    error, tolerance)  # fmt: skip
        return model, False
    log.info("evaluate: tuned model merged in memory (logits match the adapter to %.2g)", error)
    return model.unload(), True


def judge_summary(config: PipelineConfig) -> dict[str, Any]:
    """What graded the answers, for the report (no secrets)."""
    judge, local = config.eval.judge, config.eval.judge.local_model or config.model
    about = {"backend": judge.backend, "prompts": judge.prompts or "builtin", "mode": judge.mode,
               "samples": judge.samples, "temperature": judge.temperature}  # fmt: skip
    if judge.backend == "openai":
        return about | {"model": judge.model, "base_url": judge.base_url or "https://api.openai.com/v1"}
    return about | {"model": local.name_or_path, "gguf_file": local.gguf_file, "scoring": judge.local_scoring}


def write_results(work: Path, results: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, str]:
    """Write the results and plots (each whole, then renamed); log them to the active MLflow run, if any."""
    from pipeline.eval.plots import comparison_chart, radar_chart

    judge, asked = results["judge"], results["questions"]
    header = (f"# Evaluation\n\n{asked['count']} questions ({', '.join(asked['categories'])}), judge: "
              f"{judge['backend']} {judge['model']}, prompts: {judge['prompts']}.\n\n")  # fmt: skip
    table = aggregate.markdown_table(results["models"]) + "\n"
    table += aggregate.verdict_lines(results["comparisons"], results["pairwise"])
    for name, text in (("results.json", json.dumps(results, indent=2) + "\n"),
                       ("per_question.jsonl", "".join(json.dumps(row) + "\n" for row in rows)),
                       ("results.md", header + table)):  # fmt: skip
        (work / f"{name}.tmp").write_text(text, encoding="utf-8")
        (work / f"{name}.tmp").replace(work / name)
    if any(row["categories"] for row in results["models"].values()):  # else nothing was judged
        radar_chart(results["models"], work / "radar.png")
    if results["comparisons"].get("tuned-base"):
        comparison_chart(results["comparisons"]["tuned-base"], work / "comparisons.png")
    outputs = {name: path for name, path in OUTPUTS.items() if (work / path).exists()}
    if (mlflow := active_mlflow()) is not None:  # the metrics: StageResult.metrics, which the driver logs
        mlflow.set_tags({"eval.judge_backend": judge["backend"], "eval.judge_model": str(judge["model"]),
                         "eval.questions": str(asked["source"]), "eval.question_count": str(asked["count"])})
        mlflow.log_artifacts(str(work), artifact_path="evaluate")  # the outputs: work holds nothing else
    return outputs
