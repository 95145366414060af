# ruff: noqa: E501  (expected messages are compared verbatim)
"""The driver: manifests, skipping, --from/--only/--force, failures, kills, and the MLflow record.

Stages are replaced by small fake modules (the driver only knows the stage contract), except in
the last test, which runs the real prepare stage through the CLI.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest

from pipeline import stages as stage_registry
from pipeline.config import PipelineConfig
from pipeline.driver import run_pipeline
from pipeline.stages.base import StageError, StagePreempted, StageResult

REPO = Path(__file__).resolve().parents[2]
ORDER = ("prepare", "train", "evaluate", "export", "promote")
SECTIONS = {"prepare": ("data",), "train": ("adapter", "run.seed"), "evaluate": ("run.seed",), "export": (),
            "promote": ("promote",)}  # fmt: skip
INPUTS = {"prepare": (), "train": ("prepare",), "evaluate": ("prepare", "train"), "export": ("train",),
          "promote": ("evaluate", "export")}  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite MLflow store for the module (creating a store runs migrations: seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


class Fakes:
    """Fake stage modules that record their calls; ``behave[name]`` can make one fail."""

    def __init__(self):
        self.calls: dict[str, list] = {name: [] for name in ORDER}
        self.behave: dict[str, object] = {}
        self.modules = {name: self._module(name) for name in ORDER}

    def _module(self, name: str) -> types.ModuleType:
        module = types.ModuleType(f"fake_{name}")
        module.NAME, module.INPUTS, module.CONFIG_SECTIONS = name, INPUTS[name], SECTIONS[name]

        def run(ctx):
            self.calls[name].append(ctx)
            behaviour = self.behave.get(name)
            if callable(behaviour):
                behaviour(ctx)
            for upstream in INPUTS[name]:  # stages read their inputs through the context
                assert (ctx.input_dir(upstream) / "out.txt").is_file()
            (ctx.work_dir / "out.txt").write_text(f"{name} {len(self.calls[name])}")
            return StageResult(metrics={"score": float(len(name))}, outputs={"out": "out.txt"})

        module.run = run
        return module

    def install(self, monkeypatch):
        monkeypatch.setattr(stage_registry, "STAGE_ORDER", ORDER)
        monkeypatch.setattr(stage_registry, "load_stage", lambda name: self.modules[name])
        return self

    def counts(self) -> dict[str, int]:
        return {name: len(calls) for name, calls in self.calls.items()}


@pytest.fixture
def fakes(monkeypatch):
    return Fakes().install(monkeypatch)


def make_config(tmp_path: Path, store: str, **sections) -> PipelineConfig:
    raw = {"run": {"name": "r", "output_dir": str(tmp_path / "runs")}, "model": {"name_or_path": "org/model"},
           "data": {"sources": [{"builtin": 10}]}, "adapter": {"r": 8}, "tracking": {"uri": store}}  # fmt: skip
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return PipelineConfig.model_validate(raw)


def go(config, **kwargs) -> tuple[int, str]:
    from rich.console import Console

    buffer = io.StringIO()
    code = run_pipeline(config, console=Console(file=buffer, width=200), **kwargs)
    return code, buffer.getvalue()


def test_run_then_rerun_skips_everything(tmp_path, store, fakes):
    config = make_config(tmp_path, store)
    code, summary = go(config)
    assert code == 0
    assert fakes.counts() == {"prepare": 1, "train": 1, "evaluate": 1, "export": 1, "promote": 0}
    run_dir = config.run_dir
    for name in ("prepare", "train", "evaluate", "export"):
        manifest = json.loads((run_dir / name / "manifest.json").read_text())
        assert manifest["stage"] == name and manifest["outputs"] == {"out": "out.txt"}
        assert manifest["metrics"] == {"score": float(len(name))}
        assert set(manifest["inputs"]) == set(INPUTS[name])
        assert not (run_dir / f"{name}.partial").exists()
    assert not (run_dir / "promote").exists()
    assert "promote.enabled is false" in summary and f"mlflow ui --backend-store-uri {store}" in summary

    code, summary = go(config)
    assert code == 0 and fakes.counts()["train"] == 1  # nothing re-ran
    assert summary.count("up to date") == 4


def test_config_change_reruns_the_stage_and_everything_downstream(tmp_path, store, fakes):
    assert go(make_config(tmp_path, store))[0] == 0
    assert go(make_config(tmp_path, store, adapter={"r": 16}))[0] == 0
    assert fakes.counts() == {"prepare": 1, "train": 2, "evaluate": 2, "export": 2, "promote": 0}
    assert go(make_config(tmp_path, store, adapter={"r": 16}))[0] == 0
    assert fakes.counts()["export"] == 2


def test_force_and_from_and_only(tmp_path, store, fakes):
    config = make_config(tmp_path, store)
    assert go(config)[0] == 0
    assert go(config, stages=["evaluate", "export", "promote"])[0] == 0  # --from evaluate: up to date
    assert fakes.counts()["evaluate"] == 1
    assert go(config, stages=["evaluate", "export", "promote"], force=True)[0] == 0
    assert fakes.counts() == {"prepare": 1, "train": 1, "evaluate": 2, "export": 2, "promote": 0}
    assert fakes.calls["evaluate"][-1].force is True and fakes.calls["evaluate"][0].force is False
    assert go(config, stages=["train"], force=True)[0] == 0  # --only train --force
    assert fakes.counts() == {"prepare": 1, "train": 2, "evaluate": 2, "export": 2, "promote": 0}
    # train's new manifest makes evaluate/export stale: a plain run brings them up to date
    assert go(config)[0] == 0
    assert fakes.counts() == {"prepare": 1, "train": 2, "evaluate": 3, "export": 3, "promote": 0}


def test_only_needs_upstream_output(tmp_path, store, fakes, capsys):
    config = make_config(tmp_path, store)
    assert go(config, stages=["train"])[0] == 1
    assert capsys.readouterr().err.splitlines() == [
        f"stage 'train' needs up-to-date output of 'prepare' in {config.run_dir}; run it first "
        "(python -m pipeline run CONFIG --from prepare)"
    ]
    assert fakes.counts()["train"] == 0


def test_failed_stage_leaves_no_trusted_output_and_resumes(tmp_path, store, fakes, capsys):
    config = make_config(tmp_path, store)

    def crash_after_checkpoint(ctx):
        (ctx.work_dir / "checkpoint").write_text("step 3")
        raise StageError("CUDA out of memory at step 4")

    fakes.behave["train"] = crash_after_checkpoint
    code, summary = go(config)
    assert code == 1
    assert "stage 'train' failed: CUDA out of memory at step 4" in capsys.readouterr().err
    assert not (config.run_dir / "train").exists()
    assert (config.run_dir / "train.partial" / "checkpoint").read_text() == "step 3"
    assert fakes.counts() == {"prepare": 1, "train": 1, "evaluate": 0, "export": 0, "promote": 0}
    assert "failed" in summary and "not run" in summary

    resumed_from = []
    fakes.behave["train"] = lambda ctx: resumed_from.append((ctx.work_dir / "checkpoint").read_text())
    assert go(config)[0] == 0
    assert resumed_from == ["step 3"]  # the stable work dir let the stage resume
    assert fakes.counts() == {"prepare": 1, "train": 2, "evaluate": 1, "export": 1, "promote": 0}
    assert (config.run_dir / "train" / "checkpoint").is_file() and not (
        config.run_dir / "train.partial"
    ).exists()

    # a failing rerun after a config change keeps the old output but does not trust it
    fakes.behave["train"] = lambda ctx: (_ for _ in ()).throw(RuntimeError("boom"))
    changed = make_config(tmp_path, store, adapter={"r": 4})
    assert go(changed)[0] == 1
    assert "stage 'train' failed with an unexpected error: RuntimeError: boom" in capsys.readouterr().err
    assert (changed.run_dir / "train" / "manifest.json").is_file()
    fakes.behave.pop("train")
    assert go(changed)[0] == 0 and fakes.counts()["evaluate"] == 2


def test_preempted_stage_exits_zero_without_completing_and_resumes(tmp_path, store, fakes, capsys):
    """Preemption (SIGUSR1 under Slurm) is no failure: exit 0 so the job requeues, nothing trusted."""
    from mlflow.tracking import MlflowClient

    config = make_config(tmp_path, store)

    def preempt_after_checkpoint(ctx):
        (ctx.work_dir / "checkpoint").write_text("step 2")
        raise StagePreempted("training preempted (SIGUSR1) at step 2; rerun the same command to resume")

    fakes.behave["train"] = preempt_after_checkpoint
    code, summary = go(config)
    assert code == 0
    assert "stage 'train' preempted: training preempted (SIGUSR1) at step 2" in capsys.readouterr().err
    assert "preempted" in summary and "not run" in summary
    assert not (config.run_dir / "train").exists()  # not complete: a rerun must not skip it
    assert fakes.counts() == {"prepare": 1, "train": 1, "evaluate": 0, "export": 0, "promote": 0}
    client = MlflowClient(tracking_uri=store)
    parent_id = json.loads((config.run_dir / "mlflow_run.json").read_text())["run_id"]
    assert client.get_run(parent_id).info.status == "KILLED"  # neither FINISHED nor FAILED
    [child] = client.search_runs([client.get_run(parent_id).info.experiment_id],
                                 f"tags.mlflow.parentRunId = '{parent_id}' and tags.`pipeline.stage` = 'train'")  # fmt: skip
    assert child.info.status == "KILLED"

    resumed_from = []
    fakes.behave["train"] = lambda ctx: resumed_from.append((ctx.work_dir / "checkpoint").read_text())
    assert go(config)[0] == 0
    assert resumed_from == ["step 2"]
    assert fakes.counts() == {"prepare": 1, "train": 2, "evaluate": 1, "export": 1, "promote": 0}


def test_one_driver_per_run_dir(tmp_path, store, fakes, capsys):
    from filelock import FileLock

    config = make_config(tmp_path, store)
    config.run_dir.mkdir(parents=True)
    with FileLock(str(config.run_dir / "driver.lock")):
        assert go(config)[0] == 1
    assert (
        capsys.readouterr().err.strip() == f"run dir {config.run_dir} is in use by another pipeline process"
    )
    assert sum(fakes.counts().values()) == 0
    assert go(config)[0] == 0  # released with its holder


def test_promote_runs_only_when_enabled(tmp_path, store, fakes):
    config = make_config(tmp_path, store, promote={"enabled": True})
    assert go(config)[0] == 0
    assert fakes.counts()["promote"] == 1 and (config.run_dir / "promote" / "manifest.json").is_file()


def test_unreachable_tracking_store_fails_before_any_stage(tmp_path, fakes, capsys):
    config = make_config(tmp_path, "http://127.0.0.1:9")
    code, _ = go(config)
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tracking.uri: MLflow tracking server unreachable (")
    assert err.endswith("(got 'http://127.0.0.1:9')")
    assert sum(fakes.counts().values()) == 0


def test_tracking_off_needs_no_mlflow(tmp_path, fakes, monkeypatch):
    """tracking.enabled: false runs every stage with MLflow unimportable (a GPU node without it)."""
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now raises ImportError
    config = make_config(tmp_path, "http://127.0.0.1:9", tracking={"enabled": False})  # never contacted
    code, out = go(config)
    assert code == 0
    assert fakes.counts() == {"prepare": 1, "train": 1, "evaluate": 1, "export": 1, "promote": 0}
    assert [ctx.mlflow_run_id for calls in fakes.calls.values() for ctx in calls] == [None] * 4
    assert not (config.run_dir / "mlflow_run.json").exists()
    assert "MLflow:   off (tracking.enabled: false)" in out and "open UI" not in out


def test_mlflow_parent_child_runs_params_inputs(tmp_path, store, fakes):
    import mlflow
    from datasets import Dataset

    from pipeline.tracking import log_dataset

    def log_input(ctx):
        assert mlflow.active_run().info.run_id == ctx.mlflow_run_id  # the child run is active
        log_dataset(Dataset.from_list([{"text": "a"}, {"text": "b"}]), name="fake-train", context="training",
                    digest="d1g3st")  # fmt: skip

    fakes.behave["prepare"] = log_input
    config = make_config(tmp_path, store, run={"name": "tracked"})
    assert go(config)[0] == 0
    client = mlflow.MlflowClient(store)
    experiment = client.get_experiment_by_name("uora-pipeline")
    [parent] = client.search_runs([experiment.experiment_id],
                                  f"tags.`pipeline.run_dir` = '{config.run_dir}'")  # fmt: skip
    assert parent.info.run_name == "tracked" and parent.info.status == "FINISHED"
    assert parent.data.params["run.name"] == "tracked" and parent.data.params["adapter.r"] == "8"
    assert parent.data.tags["version.mlflow"] == mlflow.__version__
    assert "git.commit" in parent.data.tags
    assert parent.data.metrics["train.score"] == 5.0
    artifacts = {item.path for item in client.list_artifacts(parent.info.run_id)}
    assert "config.yaml" in artifacts
    children = client.search_runs([experiment.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")  # fmt: skip
    by_name = {run.info.run_name: run for run in children}
    assert set(by_name) == {"prepare", "train", "evaluate", "export"}
    assert by_name["evaluate"].data.metrics["score"] == 8.0
    assert {item.path for item in client.list_artifacts(by_name["export"].info.run_id)} == {"manifest.json"}
    [dataset_input] = client.get_run(by_name["prepare"].info.run_id).inputs.dataset_inputs
    assert (dataset_input.dataset.name, dataset_input.dataset.digest) == ("fake-train", "d1g3st")
    assert {tag.key: tag.value for tag in dataset_input.tags}["mlflow.data.context"] == "training"

    # a rerun of the same run dir and config resumes the same parent run
    fakes.behave.pop("prepare")
    assert go(config, stages=["export"], force=True)[0] == 0
    runs = client.search_runs([experiment.experiment_id], f"tags.`pipeline.run_dir` = '{config.run_dir}'")
    assert [run.info.run_id for run in runs] == [parent.info.run_id]


KILL_SCRIPT = """
import sys, time, types
from pathlib import Path
from pipeline import stages as registry
from pipeline.config import load_config
from pipeline.driver import run_pipeline
from pipeline.stages.base import StageResult

def module(name, inputs, slow):
    m = types.ModuleType(name)
    m.NAME, m.INPUTS, m.CONFIG_SECTIONS = name, inputs, ()
    def run(ctx):
        (ctx.work_dir / "out.txt").write_text("partial")
        if slow:
            Path(sys.argv[2]).write_text("ready")
            time.sleep(120)
        return StageResult(outputs={"out": "out.txt"})
    m.run = run
    return m

slow = sys.argv[3] == "slow"
mods = {"prepare": module("prepare", (), False), "train": module("train", ("prepare",), slow)}
registry.STAGE_ORDER = ("prepare", "train")
registry.load_stage = mods.__getitem__
sys.exit(run_pipeline(load_config(sys.argv[1])))
"""


@pytest.mark.slow
def test_sigkill_mid_stage_leaves_no_trusted_output(tmp_path, store):
    config_file = tmp_path / "c.yaml"
    config_file.write_text(
        textwrap.dedent(f"""\
        run: {{name: killed, output_dir: {tmp_path / "runs"}}}
        model: {{name_or_path: org/model}}
        tracking: {{uri: "{store}"}}
    """)
    )
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(config_file), str(ready), "slow"],
                               cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 120
        while not ready.exists():
            assert process.poll() is None and time.time() < deadline, "driver exited before the stage started"
            time.sleep(0.2)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    run_dir = tmp_path / "runs" / "killed"
    assert (run_dir / "prepare" / "manifest.json").is_file()
    assert not (run_dir / "train").exists()  # nothing a rerun would trust
    assert (run_dir / "train.partial" / "out.txt").read_text() == "partial"
    rerun = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(config_file), str(ready), "fast"], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    assert "up to date" in rerun.stdout  # prepare was not redone
    assert (run_dir / "train" / "manifest.json").is_file() and not (run_dir / "train.partial").exists()


@pytest.mark.slow
def test_sigterm_stops_cleanly_and_marks_the_run_killed(tmp_path, store):
    import mlflow

    config_file = tmp_path / "c.yaml"
    config_file.write_text(
        textwrap.dedent(f"""\
        run: {{name: termed, output_dir: {tmp_path / "runs"}}}
        model: {{name_or_path: org/model}}
        tracking: {{uri: "{store}", experiment: sigterm}}
    """)
    )
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(config_file), str(ready), "slow"],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.time() + 120
        while not ready.exists():
            assert process.poll() is None and time.time() < deadline, "driver exited before the stage started"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143
    assert "stage 'train' terminated by SIGTERM; rerun to resume" in err
    assert "terminated (SIGTERM)" in out
    run_dir = tmp_path / "runs" / "termed"
    assert not (run_dir / "train").exists() and (run_dir / "train.partial").is_dir()
    client = mlflow.MlflowClient(store)
    experiment = client.get_experiment_by_name("sigterm")
    [child] = client.search_runs([experiment.experiment_id], "tags.`pipeline.stage` = 'train'")
    assert child.info.status == "KILLED"


@pytest.mark.slow
def test_real_prepare_through_the_cli(tmp_path, store, smollm2_dir, capsys):
    """`python -m pipeline prepare CONFIG` end to end: dataset on disk, stats and inputs in MLflow."""
    import mlflow
    from datasets import load_from_disk

    from pipeline.__main__ import main

    config_file = tmp_path / "c.yaml"
    config_file.write_text(
        textwrap.dedent(f"""\
        run: {{name: real, output_dir: {tmp_path / "runs"}}}
        model: {{name_or_path: {smollm2_dir}}}
        data: {{sources: [{{builtin: 60}}], eval_size: 6, cache_dir: {tmp_path / "cache"}}}
        tracking: {{uri: "{store}", experiment: real-prepare}}
    """)
    )
    assert main(["prepare", str(config_file)]) == 0
    run_dir = tmp_path / "runs" / "real"
    dataset = load_from_disk(str(run_dir / "prepare" / "dataset"))
    assert (dataset["train"].num_rows, dataset["eval"].num_rows) == (54, 6)
    assert dataset["train"].column_names == ["messages", "source", "answer"]
    assert all(dataset["eval"]["answer"])
    stats = json.loads((run_dir / "prepare" / "stats.json").read_text())
    client = mlflow.MlflowClient(store)
    experiment = client.get_experiment_by_name("real-prepare")
    [child] = client.search_runs([experiment.experiment_id], "tags.`pipeline.stage` = 'prepare'")
    inputs = {item.dataset.name: item for item in child.inputs.dataset_inputs}
    assert set(inputs) == {"real-train", "real-eval"}
    assert inputs["real-train"].dataset.digest == stats["digests"]["train"][:16]
    assert child.data.metrics["rows_train"] == 54.0
    assert {"stats.json", "token_lengths.png", "manifest.json"} <= {
        a.path for a in client.list_artifacts(child.info.run_id)
    }
    out = capsys.readouterr().out
    assert "prepare: 60 rows in → 54 train + 6 eval" in out
    # the same command again: up to date, nothing rebuilt
    assert main(["prepare", str(config_file)]) == 0
    assert "up to date" in capsys.readouterr().out


def test_evaluating_the_base_model_alone_needs_no_training(tmp_path):
    """evaluate reads the train stage only when it scores the tuned model from it."""
    from pipeline.driver import Pipeline

    (tmp_path / "m").mkdir()

    def pipeline(**eval_section) -> Pipeline:
        return Pipeline(PipelineConfig.model_validate({
            "run": {"name": "r", "output_dir": str(tmp_path)}, "model": {"name_or_path": str(tmp_path / "m")},
            "eval": eval_section,
        }))  # fmt: skip

    assert pipeline(models=["base"]).inputs("evaluate") == ("prepare",)
    assert pipeline(models=["base", "tuned"]).inputs("evaluate") == ("prepare", "train")
    assert pipeline(tuned_path=str(tmp_path / "m")).inputs("evaluate") == ("prepare",)
    assert pipeline().inputs("export") == ("train",)  # stages without inputs(config): INPUTS
    assert pipeline(models=["base"]).missing_inputs(["prepare", "evaluate"]) == []
    assert pipeline(models=["tuned"]).missing_inputs(["prepare", "evaluate"]) == [
        f"stage 'evaluate' needs up-to-date output of 'train' in {tmp_path / 'r'}; run it first "
        "(python -m pipeline run CONFIG --from train)"
    ]


def test_result_lines_and_summary_show_base_and_tuned_side_by_side(tmp_path, store, fakes):
    from pipeline.stages import train as train_stage

    outcomes = {
        "train": {"global_step": 60.0, "train_runtime_s": 148.2, "eval_loss_before": 1.9722, "eval_loss_after": 1.8846,
                  "eval_loss_after.string": 4.30},
        "evaluate": {"base.score_overall": 4.9125, "base.score_turn1": 4.9, "base.category.math": 4.9,
                     "base.exact_match": 0.5, "tuned.score_overall": 5.1, "tuned.score_turn1": 5.0,
                     "tuned.category.math": 5.2, "tuned.exact_match": 1.0},
    }  # fmt: skip
    for name, metrics in outcomes.items():
        fake_run = fakes.modules[name].run
        fakes.modules[name].run = lambda ctx, run=fake_run, metrics=metrics: StageResult(
            metrics=metrics, outputs=run(ctx).outputs
        )
    fakes.modules["train"].summary = train_stage.summary  # the real stage's result line
    code, out = go(make_config(tmp_path, store))
    assert code == 0
    lines = out.splitlines()
    train_line = "train: 60 steps in 148 s, held-out loss 1.972 → 1.885 ("
    evaluate_line = "evaluate: score_overall 4.91 → 5.1, exact_match 0.5 → 1, score_turn1 4.9 → 5 (base → tuned) ("
    assert any(line.startswith(train_line) for line in lines)
    assert any(line.startswith(evaluate_line) for line in lines)
    assert not any(line.startswith(("prepare: ", "promote: ")) for line in lines)  # they print their own
    # a rerun skips every stage, and the summary still shows what each one measured (from its manifest)
    code, out = go(make_config(tmp_path, store))
    assert code == 0 and "up to date" in out
    assert "60 steps in 148 s, held-out loss 1.972 → 1.885" in out and "score_overall 4.91 → 5.1" in out
