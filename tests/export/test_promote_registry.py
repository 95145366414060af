"""The promote stage against a real MLflow registry (sqlite store, no server): the first version
becomes champion, a worse candidate is refused and the alias stays, a better one takes it,
``--force`` overrides (recorded), and ``models:/NAME@champion`` loads the promoted weights. The ci
gate decides on the paired interval of candidate - champion (or - base before there is one) and
falls back, saying so, when the champion has no per-question results or shares no question."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from export_helpers import finish, make_config, make_ctx, per_question_rows, write_adapter, write_eval_results
from test_export_merge import logits_on

from pipeline.digests import digest_of
from pipeline.stages import export, promote
from pipeline.stages.base import StageError


# --------------------------------------------------------------------------------------------
# the gate rule, without MLflow
# --------------------------------------------------------------------------------------------
def decide(value, champion=None, threshold=None, margin=0.0, force=False, version=None):
    if champion is not None and version is None:
        version = "1"
    return promote.gate(
        metric="tuned.score_overall",
        value=value,
        threshold=threshold,
        margin=margin,
        champion_version=version,
        champion_value=champion,
        force=force,
    )


def test_gate_rule():
    first = decide(6.0)
    assert first.promote and first.reason == "no current champion; tuned.score_overall=6"
    floor = decide(6.0, threshold=6.5)
    assert not floor.promote and floor.reason == "tuned.score_overall=6 is below the threshold 6.5"
    assert decide(6.5, threshold=6.5).promote  # at the threshold passes
    worse = decide(5.0, champion=6.0, margin=0.5)
    assert not worse.promote
    assert worse.reason == (
        "tuned.score_overall=5 is worse than the champion's 6 (version 1) by more than the margin 0.5"
    )
    assert decide(5.5, champion=6.0, margin=0.5).promote  # exactly at the margin passes
    assert decide(7.0, champion=6.0).promote
    assert not decide(None).promote and "missing" in decide(None).reason
    no_value = decide(7.0, version="1")
    assert not no_value.promote and "has no recorded tuned.score_overall" in no_value.reason
    forced = decide(1.0, champion=6.0, force=True)
    assert forced.promote and forced.forced
    assert forced.reason.startswith("forced with --force (gate failed: tuned.score_overall=1 is worse")
    assert forced.as_tags() == {
        "promotion.decision": "promoted",
        "promotion.reason": forced.reason,
        "promotion.forced": "true",
        "promotion.gate": "point",
    }


CI = {"diff": -0.02, "n": 200, "verdict": "no detectable difference", "against": "champion (version 1)",
      "paired": True, "note": None}  # fmt: skip


def decide_ci(ci95, value=0.5, champion="1", threshold=None, **interval):
    return promote.gate(
        metric="tuned.exact_match",
        value=value,
        threshold=threshold,
        margin=0.05,
        champion_version=champion,
        champion_value=0.52 if champion else None,
        mode="ci",
        interval=None if ci95 is None else {**CI, "ci95": ci95, **interval},
    )


def test_ci_gate_rule():
    crossing = decide_ci([-0.08, 0.04])
    assert not crossing.promote and crossing.gate == "ci" and crossing.interval["ci95"] == [-0.08, 0.04]
    assert crossing.reason == (
        "tuned.exact_match: candidate - champion (version 1) = -0.02, 95% interval [-0.08, +0.04] over 200 "
        "shared questions; its lower bound is not above -margin (-0.05)"
    )
    cleared = decide_ci([-0.04, 0.06])
    assert cleared.promote and cleared.reason.endswith("its lower bound is above -margin (-0.05)")
    assert not decide_ci([-0.05, 0.01]).promote  # at -margin is not above it
    assert cleared.as_tags()["promotion.gate"] == "ci" and cleared.interval["n"] == 200
    noted = decide_ci(
        [-0.04, 0.06], paired=False, note="too few questions shared with champion version 1: unpaired"
    )
    assert noted.reason.startswith(
        "too few questions shared with champion version 1: unpaired; tuned.exact_match: "
    )
    assert "over 200 (unpaired) questions" in noted.reason
    # the threshold and a missing value still refuse; no interval at all: the point rule's answer
    assert decide_ci([0.1, 0.2], threshold=0.6).reason == "tuned.exact_match=0.5 is below the threshold 0.6"
    assert decide_ci(None, champion=None).reason == "no current champion; tuned.exact_match=0.5"
    forced = promote.gate(metric="m", value=0.1, threshold=None, margin=0.0, champion_version="2",
                          champion_value=0.5, mode="ci", force=True,
                          interval={**CI, "ci95": [-0.5, -0.3]})  # fmt: skip
    assert forced.promote and forced.reason.startswith(
        "forced with --force (gate failed: m: candidate - champion"
    )


def test_flattened_results_keep_none_for_the_gate_and_pip_requirements():
    from pipeline.eval.aggregate import flatten_metrics

    models = {"tuned": {"score_overall": 7, "categories": {"math": 5.5, "writing": None}, "exact_match": None,
                        "exact_match_categories": {"gsm8k": 0.5}}}  # fmt: skip
    flat = flatten_metrics(models, keep_none=True)
    assert flat == {"tuned.score_overall": 7.0, "tuned.category.math": 5.5, "tuned.category.writing": None,
                    "tuned.exact_match": None, "tuned.exact_match.gsm8k": 0.5}  # fmt: skip
    # the gate's names are evaluate's MLflow metric names: one flattening, None kept for the gate
    assert {k: v for k, v in flat.items() if v is not None} == flatten_metrics(models)
    requirements = promote.pip_requirements(peft=True)
    names = [r.split("==")[0] for r in requirements]
    assert names[:2] == ["transformers", "torch"] and "peft" in names
    assert "torchvision" not in names and all("+" not in r for r in requirements)


# --------------------------------------------------------------------------------------------
# the stage, end to end
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_base_dir, smollm2_tokenizer):
    """Two exported runs whose adapters differ (seeds 0 and 1), with their merged logits."""
    from transformers import AutoModelForCausalLM

    built = {}
    for key, seed in (("A", 0), ("B", 1)):
        run_dir = tmp_path_factory.mktemp(f"export{key}")
        (run_dir / "prepare" / "dataset").mkdir(parents=True)
        (run_dir / "prepare" / "dataset" / "data.arrow").write_bytes(b"rows" + bytes([seed]))
        base = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
        write_adapter(run_dir, base, smollm2_tokenizer, "lora", seed=seed)
        ctx = make_ctx(run_dir, make_config(tiny_base_dir))
        export.run(ctx)
        out = finish(ctx)
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
        built[key] = {"dir": out, "logits": logits_on(merged, smollm2_tokenizer)}
    assert float((built["A"]["logits"] - built["B"]["logits"]).abs().max()) > 1e-2
    return built


def candidate(tmp_path: Path, name: str, export_dir: Path, tuned: float, rows: list | None = None) -> Path:
    """A run directory with an export (linked) and its own evaluation results."""
    run_dir = tmp_path / name
    run_dir.mkdir()
    (run_dir / "export").symlink_to(export_dir, target_is_directory=True)
    write_eval_results(run_dir, tuned=tuned, rows=rows)
    return run_dir


def promote_once(run_dir: Path, config, force: bool = False):
    """Run the stage as the driver does: inside a parent run and the stage's child run."""
    import mlflow

    with (
        mlflow.start_run(run_name="pipeline") as parent,
        mlflow.start_run(run_name="promote", nested=True) as child,
    ):
        result = promote.run(
            make_ctx(run_dir, config, stage="promote", mlflow_run_id=child.info.run_id, force=force)
        )
    return result, parent.info.run_id, child.info.run_id


def champion_logits(name: str, tokenizer) -> torch.Tensor:
    import mlflow

    components = mlflow.transformers.load_model(f"models:/{name}@champion", return_type="components")
    return logits_on(components["model"].eval(), tokenizer)


@pytest.mark.slow
def test_registry_champion_lifecycle(
    tmp_path, tiny_base_dir, smollm2_tokenizer, exports, mlflow_tracking, capsys
):
    import mlflow

    name = "lifecycle"
    config = make_config(
        tiny_base_dir, promote={"enabled": True, "registered_model": name, "margin": 0.25, "gate": "point"}
    )
    client = mlflow.MlflowClient()

    def holder() -> str:
        return str(client.get_model_version_by_alias(name, "champion").version)

    # 1. The first version becomes champion.
    result, parent_id, child_id = promote_once(candidate(tmp_path, "r1", exports["A"]["dir"], 6.0), config)
    assert result.extra["promote"] and str(result.extra["version"]) == "1" and holder() == "1"
    assert (
        "promote: lifecycle version 1 promoted to @champion: no current champion" in capsys.readouterr().out
    )
    tags = client.get_model_version(name, "1").tags
    assert tags["eval.tuned.score_overall"] == "6.0" and tags["eval.base.score_overall"] == "5.0"
    assert tags["lineage.parent_run_id"] == parent_id and tags["lineage.run_id"] == child_id
    assert tags["lineage.config_digest"] == digest_of(config.model_dump(mode="json"))
    lineage = json.loads((exports["A"]["dir"] / "lineage.json").read_text())
    assert tags["lineage.data_digest.prepare/dataset"] == lineage["data_digests"]["prepare/dataset"]
    assert tags["lineage.adapter_digest"] == lineage["adapter_digest"]
    assert tags["promotion.decision"] == "promoted" and tags["promotion.forced"] == "false"
    assert mlflow.get_run(child_id).data.tags["promotion.decision"] == "promoted"

    # 2. A worse candidate (5.0 < 6.0 - 0.25) is registered but refused; the alias stays.
    result, _, child_id = promote_once(candidate(tmp_path, "r2", exports["B"]["dir"], 5.0), config)
    assert not result.extra["promote"] and holder() == "1"
    refused = client.get_model_version(name, "2").tags
    assert refused["promotion.decision"] == "refused"
    assert refused["promotion.reason"] == (
        "tuned.score_overall=5 is worse than the champion's 6 (version 1) by more than the margin 0.25"
    )
    assert "version 2 not promoted to @champion" in capsys.readouterr().out
    assert torch.allclose(champion_logits(name, smollm2_tokenizer), exports["A"]["logits"], atol=1e-5)

    # 3. A better (here: within the margin) candidate takes the alias; loading it gives B.
    result, _, _ = promote_once(candidate(tmp_path, "r3", exports["B"]["dir"], 5.9), config)
    assert result.extra["promote"] and holder() == "3"
    assert torch.allclose(champion_logits(name, smollm2_tokenizer), exports["B"]["logits"], atol=1e-5)

    # 4. --force promotes a failing candidate, and says so.
    result, _, child_id = promote_once(
        candidate(tmp_path, "r4", exports["A"]["dir"], 1.0), config, force=True
    )
    assert holder() == "4"
    forced = client.get_model_version(name, "4").tags
    assert forced["promotion.forced"] == "true"
    assert forced["promotion.reason"].startswith("forced with --force (gate failed: tuned.score_overall=1")
    assert mlflow.get_run(child_id).data.tags["promotion.forced"] == "true"
    decision = json.loads((tmp_path / "r4" / "promote.partial" / "decision.json").read_text())
    assert decision["forced"] and decision["champion_version"] in (3, "3")


@pytest.mark.slow
def test_adapter_only_model_registered_and_loaded_by_alias(
    tmp_path, tiny_base_dir, smollm2_tokenizer, exports, mlflow_tracking, caplog
):
    import mlflow
    from peft import PeftModel

    name = "adapter-only"
    config = make_config(
        tiny_base_dir,
        promote={
            "registered_model": name,
            "log": ["merged", "adapter"],
            "register_from": "adapter",
            "gate": "point",
        },
    )
    mlflow_logger = logging.getLogger("mlflow")  # MLflow's loggers do not propagate to the root
    mlflow_logger.addHandler(caplog.handler)
    try:
        result, _, _ = promote_once(candidate(tmp_path, "r", exports["A"]["dir"], 6.0), config)
    finally:
        mlflow_logger.removeHandler(caplog.handler)
    assert set(result.extra["logged_models"]) == {"merged", "adapter"}
    # both carry export's model card: MLflow neither looks for one on the hub nor warns about a licence
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [message for message in warned if "card" in message or "license" in message], warned
    for kind, uri in result.extra["logged_models"].items():
        saved = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path / kind)))
        front_matter_and_text = (exports["A"]["dir"] / kind / "README.md").read_text().split("---\n", 2)
        assert (saved / "model_card.md").read_text() == front_matter_and_text[2]
    model = mlflow.transformers.load_model(f"models:/{name}@champion", return_type="components")["model"]
    assert isinstance(model, PeftModel)
    assert torch.allclose(logits_on(model.eval(), smollm2_tokenizer), exports["A"]["logits"], atol=1e-4)


def test_promote_input_errors_are_one_clear_line(tmp_path, tiny_base_dir):
    run_dir = tmp_path / "run"
    (run_dir / "export").mkdir(parents=True)
    config = make_config(tiny_base_dir)
    with pytest.raises(StageError, match=r"stage input missing: .*evaluate"):
        promote.run(make_ctx(run_dir, config, stage="promote"))
    write_eval_results(run_dir, tuned=6.0)
    with pytest.raises(
        StageError,
        match=r"^promote: .*per_question.jsonl is missing \(re-run evaluate, which writes it, or set ",
    ):
        promote.run(make_ctx(run_dir, config, stage="promote"))
    config = make_config(tiny_base_dir, promote={"gate": "point"})
    bad = make_config(tiny_base_dir, promote={"gate_metric": "tuned.score_overal"})
    with pytest.raises(
        StageError,
        match=r"^promote.gate_metric: 'tuned.score_overal' is not in the evaluate results "
        r"\(available: base.exact_match, base.judge_failures, base.score_overall",
    ):
        promote.run(make_ctx(run_dir, bad, stage="promote"))
    with pytest.raises(
        StageError, match=r"^promote: .*lineage.json is missing \(the export stage writes it\)$"
    ):
        promote.run(make_ctx(run_dir, config, stage="promote"))
    (run_dir / "export" / "lineage.json").write_text("{}")
    with pytest.raises(
        StageError, match=r"^promote.log: .*merged does not exist \(export.mode is adapter_only\?\)$"
    ):
        promote.run(make_ctx(run_dir, config, stage="promote"))


@pytest.mark.slow
def test_ci_gate_pairs_with_the_champion_and_records_the_interval(
    tmp_path, tiny_base_dir, exports, mlflow_tracking, capsys
):
    import mlflow

    name = "ci-gate"
    config = make_config(
        tiny_base_dir,
        promote={
            "enabled": True,
            "registered_model": name,
            "gate_metric": "tuned.exact_match",
            "margin": 0.05,
        },
    )
    client = mlflow.MlflowClient()
    champion_hits = [1] * 30 + [0] * 10

    def attempt(run: str, tuned_hits: list[int], keys: list[str] | None = None) -> dict:
        rows = per_question_rows([1] * 10 + [0] * 30, tuned_hits, keys)
        promote_once(candidate(tmp_path, run, exports["A"]["dir"], 6.0, rows), config)
        return json.loads((tmp_path / run / "promote.partial" / "decision.json").read_text())

    # 1. No champion yet: tuned - base over this run's 40 questions (+0.5) clears -margin.
    first = attempt("r1", champion_hits)
    assert first["promote"] and first["gate"] == "ci"
    assert first["interval"]["against"] == "base (no champion yet)" and first["interval"]["paired"]
    assert (
        first["interval"]["diff"] == 0.5 and first["interval"]["ci95"][0] > 0 and first["interval"]["n"] == 40
    )
    stored = client.get_model_version(name, "1").tags[promote.PER_QUESTION_TAG]
    assert stored.startswith("runs:/") and stored.endswith("/evaluation/per_question.jsonl")

    # 2. Two questions lost against the champion: -0.05, an interval that crosses -margin: refused.
    crossing = attempt("r2", [0, 0, *champion_hits[2:]])
    assert not crossing["promote"] and str(crossing["champion_version"]) == "1"
    low, high = crossing["interval"]["ci95"]
    assert crossing["interval"]["diff"] == -0.05 and low < -0.05 < high and crossing["interval"]["paired"]
    assert crossing["reason"] == (
        "tuned.exact_match: candidate - champion (version 1) = -0.05, 95% interval "
        f"[{low:+.4g}, {high:+.4g}] over 40 shared questions; its lower bound is not above -margin (-0.05)"
    )
    assert client.get_model_version(name, "2").tags["promotion.decision"] == "refused"

    # 3. Two questions gained: the interval's lower bound (0) clears -margin: promoted.
    cleared = attempt("r3", [*champion_hits[:30], 1, 1, *champion_hits[32:]])
    assert (
        cleared["promote"] and cleared["interval"]["diff"] == 0.05 and cleared["interval"]["ci95"][0] == 0.0
    )
    assert str(client.get_model_version_by_alias(name, "champion").version) == "3"
    capsys.readouterr()

    # 4. No question in common with the champion: said in one line, unpaired intervals.
    unshared = attempt("r4", champion_hits, keys=[f"other{i}" for i in range(40)])
    note = "too few questions shared with champion version 3: unpaired intervals"
    assert unshared["interval"]["note"] == note and not unshared["interval"]["paired"]
    assert unshared["reason"].startswith(note + "; tuned.exact_match: candidate - champion (version 3) = ")
    assert note in capsys.readouterr().out

    # 5. A champion registered before per-question results were stored: its recorded value instead.
    client.delete_model_version_tag(name, "3", promote.PER_QUESTION_TAG)
    old = attempt("r5", champion_hits[:30] + [1] * 10)
    note = (
        "champion version 3 has no per-question results (registered before they were stored): the "
        "candidate's own interval minus the champion's recorded tuned.exact_match"
    )
    assert old["interval"]["note"] == note and not old["interval"]["paired"]
    assert old["interval"]["diff"] == round(1.0 - 0.8, 4) and old["interval"]["ci95"] == [0.2, 0.2]
    assert old["promote"] and note in capsys.readouterr().out
