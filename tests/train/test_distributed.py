"""2-process CPU training (torchrun): DDP, ZeRO-2 and ZeRO-3 agree; ZeRO-2 in bf16 keeps float32
projections; preemption resumes exactly.

All runs use a tiny random Llama with SmolLM2's tokenizer and a UORA adapter whose re-init
threshold (0.5) sits above d_initial (0.1), so re-initialisation fires on every step: the runs
exercise the projections changing during training, on every rank, across an interruption.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import make_config, write_prepared

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ZERO2 = str(REPO / "configs" / "deepspeed" / "zero2.json")
ZERO3 = str(REPO / "configs" / "deepspeed" / "zero3.json")

UORA = {
    "method": "uora",
    "r": 8,
    "target_modules": ["q_proj", "v_proj", "down_proj"],
    "reinit_threshold": 0.5,
    "reinit_alpha": 0.5,
    "reinit_patience": 1,
}
STEPS = 8


def _launch(
    run_dir: Path, model_dir: Path, train: dict, wait: bool = True, mlflow_uri: str | None = None
) -> subprocess.Popen | int:
    """Run the train stage in a fresh Python process (the 'launcher' of the torchrun workers);
    with ``mlflow_uri``, inside an active MLflow run as the driver does."""
    config = make_config(run_dir, str(model_dir), adapter=UORA, train={"nproc_per_node": 2, **train})
    (run_dir / "config.json").write_text(config.model_dump_json(exclude_unset=True))
    script = (
        "import json,sys; from pathlib import Path;"
        "from pipeline.config import PipelineConfig; from pipeline.stages import train;"
        "from pipeline.stages.base import StageContext, StageError;"
        f"run_dir=Path({str(run_dir)!r});"
        "cfg=PipelineConfig.model_validate_json((run_dir/'config.json').read_text());"
        "import mlflow, contextlib;"
        f"uri={mlflow_uri!r}; uri and mlflow.set_tracking_uri(uri);"
        "exp=uri and mlflow.create_experiment('t', artifact_location=str(run_dir / 'artifacts'));"
        "active=mlflow.start_run(experiment_id=exp) if uri else contextlib.nullcontext();\n"
        "with active as r:\n"
        "  ctx=StageContext(config=cfg, run_dir=run_dir, work_dir=run_dir/'train.partial',"
        "                   mlflow_run_id=r.info.run_id if r else None)\n"
        "  try:\n    print('RESULT', json.dumps(train.run(ctx).metrics))\n"
        "  except train.StagePreempted as e:\n    print('PREEMPTED', e); sys.exit(0)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env)
    return proc.wait(timeout=500) if wait else proc


def _run(tmp: Path, name: str, model_dir: Path, train: dict, mlflow_uri: str | None = None) -> Path:
    run_dir = tmp / name
    write_prepared(run_dir)
    assert _launch(run_dir, model_dir, train, mlflow_uri=mlflow_uri) == 0
    work = run_dir / "train.partial"
    assert (work / "DONE").is_file()
    return work


@pytest.fixture(scope="module")
def dist_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def ddp_run(dist_dir, tiny_model_dir) -> Path:
    """The reference: plain DDP (gloo) across two CPU processes."""
    return _run(dist_dir, "ddp", tiny_model_dir, {"max_steps": STEPS}, mlflow_uri=_mlflow_uri(dist_dir))


def _mlflow_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture(scope="module")
def runs(dist_dir, tiny_model_dir, ddp_run) -> dict[str, Path]:
    base = {"max_steps": STEPS}
    return {
        "ddp": ddp_run,
        "zero2": _run(dist_dir, "zero2", tiny_model_dir, {**base, "deepspeed": ZERO2}),
        "zero3": _run(dist_dir, "zero3", tiny_model_dir, {**base, "deepspeed": ZERO3}),
        "zero2_bf16": _run(
            dist_dir, "zero2_bf16", tiny_model_dir, {**base, "deepspeed": ZERO2, "bf16": True}
        ),
    }


def _adapter(work: Path) -> dict[str, torch.Tensor]:
    return load_file(work / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("variant", ["zero2", "zero3"])
def test_deepspeed_adapter_equals_ddp(runs, variant):
    reference, got = _adapter(runs["ddp"]), _adapter(runs[variant])
    assert sorted(got) == sorted(reference)
    for key, tensor in reference.items():
        assert got[key].shape == tensor.shape and got[key].numel() > 0, key
        torch.testing.assert_close(got[key], tensor, atol=1e-6, rtol=0, msg=key)
    # the adapter learnt something: b started at zero
    assert any(t.abs().max() > 0 for k, t in got.items() if "uora_lambda_b" in k or k.endswith("_b"))


def test_both_ranks_processed_data_and_projections_agree(runs):
    for work in runs.values():
        digests = json.loads((work / "projection_digests.json").read_text())
        assert len(digests) == 2 and digests[0] == digests[1]
        metrics = json.loads((work / "metrics.json").read_text())
        assert metrics["global_step"] == STEPS
        assert metrics["uora_reinit_events"] > 0
    # a global batch is 2 ranks x 2 rows: twice the tokens of one rank's batches
    ddp = json.loads((runs["ddp"] / "metrics.json").read_text())["train_tokens"]
    assert ddp > 0
    for name in ("zero2", "zero3", "zero2_bf16"):
        assert json.loads((runs[name] / "metrics.json").read_text())["train_tokens"] == ddp


def test_bf16_zero2_keeps_float32_projections_of_the_float32_run(runs):
    """DeepSpeed's bf16 engine casts every parameter (d, b) to bf16, on CPU too; the projections
    stay float32 and, with every slot re-initialised at every step, bit-equal to the float32 run's
    and to the float32 interpolation. Both ranks hold them (digests above), with DDP-style buffer
    broadcasting off."""
    from train_helpers import forced_projections

    got, fp32 = _adapter(runs["zero2_bf16"]), _adapter(runs["ddp"])
    assert got["base_model.model.model.layers.0.self_attn.q_proj.uora_lambda_d"].dtype == torch.bfloat16
    metrics = json.loads((runs["zero2_bf16"] / "metrics.json").read_text())
    assert metrics["uora_reinit_events"] == STEPS * 6 * 8  # every slot of the 6 layers, every step
    want = forced_projections(got["base_model.uora_A"].shape, got["base_model.uora_B"].shape, 6, STEPS)
    for key, expected in zip(("base_model.uora_A", "base_model.uora_B"), want, strict=True):
        assert got[key].dtype == torch.float32 and torch.equal(got[key], fp32[key]), key
        torch.testing.assert_close(got[key], expected, rtol=0, atol=1e-6, msg=key)


def _wait_for(path: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"timed out waiting for {path}"
        time.sleep(0.2)


def _wait_until_training(work: Path, after_step: int = 0) -> None:
    """Until rank 0 reports an optimizer step past ``after_step`` (progress.json, written per log)."""
    progress = work / "progress.json"
    deadline = time.monotonic() + 300
    while True:
        assert time.monotonic() < deadline, "training made no progress"
        try:
            if json.loads(progress.read_text())["step"] > after_step:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)


def _events(history: list[dict]) -> list[tuple[int, int]]:
    return [(e["step"], e["uora/reinit_events"]) for e in history if "uora/reinit_events" in e]


def test_preempt_and_resume_is_bit_identical(ddp_run, tmp_path, tiny_model_dir):
    run_dir = tmp_path / "resume"
    write_prepared(run_dir)
    work = run_dir / "train.partial"
    train = {"max_steps": STEPS}

    # 1) SIGUSR1 to rank 1 only: the flag is all-reduced, both ranks checkpoint and exit 0
    proc = _launch(run_dir, tiny_model_dir, {**train, "max_steps": STEPS}, wait=False)
    _wait_for(work / "pids" / "rank1.pid")
    _wait_until_training(work)
    os.kill(int((work / "pids" / "rank1.pid").read_text()), signal.SIGUSR1)
    assert proc.wait(timeout=300) == 0
    first = json.loads((work / "PREEMPTED").read_text())
    assert not (work / "DONE").exists() and first["signal"] == "SIGUSR1"
    assert 1 <= first["step"] < STEPS

    # 2) rerun resumes; SIGTERM to the launcher is forwarded through torchrun to the workers
    (work / "pids" / "rank1.pid").unlink()
    proc = _launch(run_dir, tiny_model_dir, train, wait=False)
    _wait_for(work / "pids" / "rank1.pid")
    _wait_until_training(work, after_step=first["step"])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0
    second = json.loads((work / "PREEMPTED").read_text())
    assert not (work / "DONE").exists() and second["signal"] == "SIGTERM"
    assert first["step"] < second["step"] < STEPS

    # 3) rerun the same command: resumes from the last complete checkpoint and finishes
    assert _launch(run_dir, tiny_model_dir, train) == 0
    assert (work / "DONE").is_file()
    got, reference = _adapter(work), _adapter(ddp_run)
    assert sorted(got) == sorted(reference)
    for key in reference:
        assert torch.equal(got[key], reference[key]), key
    history = json.loads((work / "log_history.json").read_text())
    events = _events(history)
    assert any(step <= first["step"] and n > 0 for step, n in events)
    assert any(step > second["step"] and n > 0 for step, n in events)


def test_only_rank0_logs_to_the_stage_run(ddp_run, dist_dir):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=_mlflow_uri(dist_dir))
    (run,) = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert steps == list(range(1, STEPS + 1))  # once per step: one process logged, not two
    for key in ("learning_rate", "grad_norm", "tokens_per_second", "uora/reinit_events", "eval_loss"):
        assert client.get_metric_history(run.info.run_id, key), key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss_curve.png", "config.yaml", "metrics.json"} <= artifacts
