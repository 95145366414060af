"""The export stage: merged logits equal base + adapter (checked here independently of the stage's
own verification), the folder is a complete HF model, failures leave nothing trusted behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from export_helpers import (
    TEMPLATE_MARKER,
    finish,
    make_config,
    make_ctx,
    peft_config,
    perturb_adapter,
    require_uora,
    write_adapter,
    write_eval_results,
)

from pipeline import adapters
from pipeline.stages import export
from pipeline.stages.base import StageError

# Prompts of the tests' own (not the stage's verification prompts).
CHECK_PROMPTS = ["Name a colour.", "How many legs does a spider have? Answer briefly."]


def logits_on(model, tokenizer, prompts: list[str] = CHECK_PROMPTS) -> torch.Tensor:
    rows = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            )["input_ids"]
            rows.append(model(input_ids=ids).logits[0].float())
    return torch.cat(rows)


def reference_logits(
    base_dir: Path, adapter_dir: Path, tokenizer, prompts: list[str] = CHECK_PROMPTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """(base + adapter, base alone) logits in float32, through PEFT's unmerged forward."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with_adapter = logits_on(model, tokenizer, prompts)
    with model.disable_adapter():
        without = logits_on(model, tokenizer, prompts)
    return with_adapter, without


def export_and_check(
    tmp_path: Path, base_dir: Path, tokenizer, method: str, prompts: list[str] = CHECK_PROMPTS, **export_cfg
) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if method == "uora":
        require_uora()
    from transformers import AutoModelForCausalLM as Auto

    run_dir = tmp_path / "run"
    write_adapter(run_dir, Auto.from_pretrained(base_dir, dtype=torch.float32), tokenizer, method)
    write_eval_results(run_dir, tuned=6.5)
    ctx = make_ctx(run_dir, make_config(base_dir, export=export_cfg), mlflow_run_id=None)
    result = export.run(ctx)
    out = finish(ctx)

    merged_dir = out / "merged"
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert not any("lora" in n or "vera" in n or "uora" in n for n, _ in merged.named_parameters())
    merged_tok = AutoTokenizer.from_pretrained(merged_dir)
    assert TEMPLATE_MARKER in merged_tok.chat_template  # the training template, not the base's

    ref, base_only = reference_logits(base_dir, run_dir / "train" / "adapter", tokenizer, prompts)
    got = logits_on(merged, merged_tok, prompts)
    error = float((got - ref).abs().max())
    effect = float((ref - base_only).abs().max())
    return {"result": result, "out": out, "error": error, "effect": effect, "merged": merged}


@pytest.mark.parametrize("method", ["lora", "vera", "uora"])
def test_tiny_merge_matches_base_plus_adapter(tmp_path, tiny_base_dir, smollm2_tokenizer, method):
    checked = export_and_check(tmp_path, tiny_base_dir, smollm2_tokenizer, method, max_shard_size="2MB")
    # The adapter moves the logits; the merged model reproduces the moved logits.
    assert checked["effect"] > 1e-2
    assert checked["error"] < 1e-4 * checked["effect"] + 1e-5, checked

    result, out = checked["result"], checked["out"]
    report = result.extra["verification"]
    assert report["passed"] and report["top1_agreement"] == 1.0
    assert report["rel_error"] <= report["tolerance"] == adapters.DEFAULT_TOLERANCE["float32"]
    assert result.metrics["verify_max_abs_error"] == report["max_abs_error"]
    assert result.outputs == {
        "adapter": "adapter",
        "lineage": "lineage.json",
        "merged": "merged",
        "verification": "verification.json",
    }
    # Sharded safetensors, config, generation config, tokenizer, model card; adapter kept.
    merged_dir = out / "merged"
    index = json.loads((merged_dir / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((merged_dir / s).is_file() for s in shards)
    assert not list(merged_dir.glob("*.bin"))
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (merged_dir / name).is_file(), name
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
    card = (merged_dir / "README.md").read_text()
    assert f"| Method | {method.upper()} |" in card
    assert f"| Base model | `{tiny_base_dir}` |" in card
    trainable = report["trainable_params"]
    assert trainable > 0 and f"{trainable:,}" in card
    # export does not depend on evaluate, so its card quotes no score (evaluate/results.json says 6.5)
    assert "6.5" not in card and "score_overall" not in card and "`eval.*` tags" in card
    # the adapter's card replaces PEFT's empty template: the same facts, loading through PEFT
    adapter_card = (out / "adapter" / "README.md").read_text()
    assert "More Information Needed" not in adapter_card and "library_name: peft" in adapter_card
    for row in (f"| Method | {method.upper()} |", f"| Base model | `{tiny_base_dir}` |", f"{trainable:,} of",
                "PeftModel.from_pretrained(base, FOLDER)", "`eval.*` tags"):  # fmt: skip
        assert row in adapter_card, row
    assert "6.5" not in adapter_card and "Merge verification" not in adapter_card
    assert ("import uora" in adapter_card) == (method == "uora")
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["method"] == method and lineage["trainable_params"] == trainable
    assert len(lineage["adapter_digest"]) == 64


def test_bfloat16_export_uses_bf16_tolerance_and_weights(tmp_path, tiny_base_dir, smollm2_tokenizer):
    checked = export_and_check(tmp_path, tiny_base_dir, smollm2_tokenizer, "lora", dtype="bfloat16")
    report = checked["result"].extra["verification"]
    assert report["dtype"] == "bfloat16" and report["tolerance"] == adapters.DEFAULT_TOLERANCE["bfloat16"]
    assert report["passed"]
    from safetensors import safe_open

    shard = next((checked["out"] / "merged").glob("*.safetensors"))
    with safe_open(str(shard), "pt") as handle:
        assert handle.get_tensor(next(iter(handle.keys()))).dtype == torch.bfloat16
    assert json.loads((checked["out"] / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    # One bf16 rounding of the merged weights: close to the float32 reference, not equal, and far
    # closer than the adapter's own effect (a merge that dropped the adapter would fail).
    assert 0 < report["rel_error"] < 0.1 * report["adapter_effect_rel"]
    assert 0 < checked["error"] < 0.1 * checked["effect"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "vera", "uora"])
def test_smollm2_merge_matches_base_plus_adapter(tmp_path, smollm2_dir, smollm2_tokenizer, method):
    # One short prompt each for the stage's check and this test's own: SmolLM2 forwards dominate
    # this file's CPU time.
    checked = export_and_check(
        tmp_path,
        smollm2_dir,
        smollm2_tokenizer,
        method,
        CHECK_PROMPTS[:1],
        verify_prompts=1,
        verify_max_tokens=40,
    )
    assert checked["effect"] > 0.1
    assert checked["error"] < 1e-3, checked
    report = checked["result"].extra["verification"]
    assert report["passed"] and report["top1_agreement"] == 1.0
    assert report["adapter_effect_rel"] > 100 * report["rel_error"]


def test_failed_verification_fails_stage_and_leaves_no_merged_folder(
    tmp_path, tiny_base_dir, smollm2_tokenizer, monkeypatch
):
    from peft.tuners.tuners_utils import BaseTuner
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    write_adapter(run_dir, AutoModelForCausalLM.from_pretrained(tiny_base_dir), smollm2_tokenizer, "lora")
    # A broken merge: drop the adapter instead of folding it in.
    monkeypatch.setattr(BaseTuner, "merge_and_unload", lambda self, **kw: self.unload())
    ctx = make_ctx(run_dir, make_config(tiny_base_dir))
    with pytest.raises(StageError, match=r"^export: verification failed: merged logits differ"):
        export.run(ctx)
    assert not (ctx.work_dir / "merged").exists()
    assert not (ctx.work_dir / "merged.tmp").exists()
    report = json.loads((ctx.work_dir / "verification.json").read_text())
    assert report["passed"] is False and report["rel_error"] > report["tolerance"]


def test_refuses_to_overwrite_existing_export_unless_forced(tmp_path, tiny_base_dir, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    write_adapter(run_dir, AutoModelForCausalLM.from_pretrained(tiny_base_dir), smollm2_tokenizer, "lora")
    (run_dir / "export").mkdir()
    (run_dir / "export" / "keep.txt").write_text("previous export")
    config = make_config(tiny_base_dir, export={"mode": "adapter_only"})
    with pytest.raises(StageError, match=r"export: .*export already exists; pass --force to overwrite it"):
        export.run(make_ctx(run_dir, config))
    assert (run_dir / "export" / "keep.txt").read_text() == "previous export"

    result = export.run(make_ctx(run_dir, config, force=True))
    assert result.outputs == {"adapter": "adapter", "lineage": "lineage.json"}
    assert not (run_dir / "export.partial" / "merged").exists()  # adapter_only: no merge at all
    card = (run_dir / "export.partial" / "adapter" / "README.md").read_text()
    assert "| Method | LORA |" in card and "Trainable parameters" not in card  # known only after a merge


def test_missing_adapter_is_one_clear_line(tmp_path, tiny_base_dir):
    run_dir = tmp_path / "run"
    (run_dir / "train" / "adapter").mkdir(parents=True)
    with pytest.raises(
        StageError,
        match=r"^export: .*adapter_config.json is missing \(the train stage writes it\)$",
    ):
        export.run(make_ctx(run_dir, make_config(tiny_base_dir)))
    with pytest.raises(StageError, match=r"stage input missing: .*train"):
        export.run(make_ctx(tmp_path / "other", make_config(tiny_base_dir)))


def test_export_logs_verification_to_active_mlflow_run(
    tmp_path, tiny_base_dir, smollm2_tokenizer, mlflow_tracking
):
    import mlflow
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    write_adapter(run_dir, AutoModelForCausalLM.from_pretrained(tiny_base_dir), smollm2_tokenizer, "lora")
    with mlflow.start_run() as parent, mlflow.start_run(nested=True) as child:
        result = export.run(make_ctx(run_dir, make_config(tiny_base_dir), mlflow_run_id=child.info.run_id))
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(child.info.run_id)}
    assert result.metrics["verify_max_abs_error"] >= 0
    assert not mlflow.get_run(child.info.run_id).data.metrics  # the driver logs the StageResult's
    assert {"verification.json", "lineage.json", "model_card"} <= artifacts
    lineage = json.loads((run_dir / "export.partial" / "lineage.json").read_text())
    assert lineage["mlflow_run_id"] == child.info.run_id
    assert lineage["mlflow_parent_run_id"] == parent.info.run_id


def test_export_metrics_reach_mlflow_once_through_the_driver(
    tmp_path, tiny_base_dir, smollm2_tokenizer, mlflow_tracking, monkeypatch
):
    """The driver runs a stand-in train stage and the real export against the tmp MLflow store:
    every export metric has one history entry on the export run and one (``export.<name>``) on the
    parent. Export used to log its metrics itself too: two entries each."""
    import io
    import types

    import mlflow
    from peft import get_peft_model
    from rich.console import Console
    from transformers import AutoModelForCausalLM

    from pipeline import stages as stage_registry
    from pipeline.config import PipelineConfig
    from pipeline.driver import run_pipeline
    from pipeline.stages.base import StageResult

    def train_run(ctx):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base_dir), peft_config("lora"))
        perturb_adapter(model)
        model.save_pretrained(ctx.work_dir / "adapter")
        smollm2_tokenizer.save_pretrained(ctx.work_dir / "adapter")
        return StageResult(metrics={}, outputs={"adapter": "adapter"})

    fake = types.SimpleNamespace(NAME="train", INPUTS=(), CONFIG_SECTIONS=(), run=train_run)
    real = stage_registry.load_stage
    monkeypatch.setattr(stage_registry, "load_stage", lambda name: fake if name == "train" else real(name))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_tracking)  # restored after the test
    config = PipelineConfig(
        run={"name": "logged-once", "output_dir": str(tmp_path)},
        model={"name_or_path": str(tiny_base_dir)},
        export={"verify_prompts": 2},
        tracking={"uri": mlflow_tracking, "experiment": "export-logged-once"},
    )
    assert run_pipeline(config, stages=["train", "export"], console=Console(file=io.StringIO())) == 0
    manifest = json.loads((config.run_dir / "export" / "manifest.json").read_text())
    client = mlflow.MlflowClient(mlflow_tracking)
    parent = client.get_run(manifest["mlflow_run_id"]).data.tags["mlflow.parentRunId"]
    assert {"verify_max_abs_error", "verify_rel_error", "trainable_params"} <= set(manifest["metrics"])
    for key in manifest["metrics"]:
        assert len(client.get_metric_history(manifest["mlflow_run_id"], key)) == 1, key
        assert len(client.get_metric_history(parent, f"export.{key}")) == 1, key
