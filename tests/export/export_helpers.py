"""Helpers for the export and promote tests: hand-built adapters, run directories laid out the
way the train/evaluate stages leave them, and StageContexts built by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

# A marker appended to the chat template saved beside the adapter, so tests can tell that the
# export carries the *training* template and not the base tokenizer's.
TEMPLATE_MARKER = "{# trained-with-export-tests #}"

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def require_uora() -> Any:
    """The ``uora`` package, or a skip while only its skeleton exists (no UoraConfig yet)."""
    uora = pytest.importorskip("uora")
    if not hasattr(uora, "UoraConfig"):
        pytest.skip("uora.UoraConfig is not available yet")
    return uora


def peft_config(method: str) -> Any:
    """A small adapter config of each method, all targeting every linear layer of a block."""
    if method == "lora":
        from peft import LoraConfig

        return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM")
    if method == "vera":
        from peft import VeraConfig

        return VeraConfig(r=16, target_modules=TARGETS, task_type="CAUSAL_LM")
    if method == "uora":
        return require_uora().UoraConfig(r=16, target_modules=TARGETS, task_type="CAUSAL_LM")
    raise ValueError(method)


def perturb_adapter(model: Any, seed: int = 0, scale: float = 0.02) -> None:
    """Stand-in for training: move every trainable adapter tensor by seeded noise, so the
    adapter visibly changes the logits (LoRA's B and VeRA's lambda_b start at zero)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                param.add_(noise.to(param.dtype) * scale)


METHOD_SCALE = {"lora": 0.02, "vera": 0.5, "uora": 0.5}


def write_adapter(
    run_dir: Path, base: Any, tokenizer: Any, method: str, seed: int = 0, scale: float | None = None
) -> Any:
    """What the train stage leaves: ``<run_dir>/train/adapter`` (PEFT folder + tokenizer)."""
    import torch
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(base, peft_config(method))
    perturb_adapter(model, seed, METHOD_SCALE[method] if scale is None else scale)
    adapter_dir = run_dir / "train" / "adapter"
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    (run_dir / "train" / "DONE").write_text("")
    return model


def make_config(model_dir: Path | str, *, export: dict | None = None, promote: dict | None = None, **model):
    from pipeline.config import PipelineConfig

    return PipelineConfig(
        run={"name": "export-test"},
        model={"name_or_path": str(model_dir), **model},
        export={"verify_prompts": 2, **(export or {})},  # 2 prompts keep tiny-model tests quick
        promote=promote or {},
    )


def make_ctx(run_dir: Path, config: Any, stage: str = "export", **kwargs: Any) -> Any:
    from pipeline.stages.base import StageContext

    return StageContext(config=config, run_dir=run_dir, work_dir=run_dir / f"{stage}.partial", **kwargs)


def finish(ctx: Any, stage: str = "export") -> Path:
    """What the driver does after run() returns: rename <stage>.partial to <stage>."""
    final = ctx.run_dir / stage
    if final.exists():
        import shutil

        shutil.rmtree(final)
    ctx.work_dir.rename(final)
    return final


def write_eval_results(run_dir: Path, tuned: float, base: float = 5.0, rows: list | None = None) -> None:
    """``<run_dir>/evaluate/results.json`` in the evaluate stage's format (and ``per_question.jsonl``
    when ``rows`` are given; see ``per_question_rows``)."""

    def scores(overall: float) -> dict:
        return {
            "score_overall": overall,
            "score_turn1": overall + 0.5,
            "score_turn2": overall - 0.5,
            "categories": {"writing": overall, "math": overall - 1},
            "judge_failures": 0,
            "exact_match": None,
        }

    folder = run_dir / "evaluate"
    folder.mkdir(parents=True, exist_ok=True)
    results = {"models": {"base": scores(base), "tuned": scores(tuned)}, "judge": {"backend": "test"}}
    if rows is not None:
        for model in ("base", "tuned"):
            hits = [v for row in rows for v in row["models"][model]["exact"]]
            results["models"][model]["exact_match"] = sum(hits) / len(hits)
        (folder / "per_question.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "results.json").write_text(json.dumps(results))


def per_question_rows(base_hits: list[int], tuned_hits: list[int], keys: list[str] | None = None) -> list:
    """Evaluate's per-question rows for one-turn verifiable questions: exact-match hits per model."""
    keys = keys or [f"q{i}" for i in range(len(tuned_hits))]
    return [
        {"question_id": key, "key": key, "category": "builtin:list", "judged": False,
         "models": {"base": {"score": [None], "exact": [float(b)], "words": [3]},
                    "tuned": {"score": [None], "exact": [float(t)], "words": [3]}}}
        for key, b, t in zip(keys, base_hits, tuned_hits, strict=True)
    ]  # fmt: skip
