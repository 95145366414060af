"""slurm/train.sh's mechanics on the real test cluster, with the stand-in worker (toy_worker.py).

What is proven here, independent of the training recipe: one torchrun per node joined by c10d
rendezvous over two Slurm nodes; SIGUSR1 to the batch shell (early, while the workers start; and
Slurm's own time-limit warning) reaching the workers without killing torchrun, checkpoint,
self-requeue, resume, DONE, with a result bit-identical to an uninterrupted run; a dependent job
waiting through the requeue; the log appended across restarts; the restart cap; resuming by
hand; failures not requeued and their exit status kept; `pipeline.sh --chain` wiring.
tests/slurm/test_slurm_pipeline.py does the same with the real train stage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm.conftest import REPO_ROOT, SlurmCluster

pytestmark = pytest.mark.slow

TOY = REPO_ROOT / "tests" / "slurm" / "toy_worker.py"
TRAIN_SH = REPO_ROOT / "slurm" / "train.sh"
STEPS = "30"


def toy_env(out: Path, **extra: str) -> dict[str, str]:
    """slurm/train.sh with the stand-in as its training command (CONFIG is the output folder)."""
    return {
        "UORA_TRAIN_CMD": f'exec "$UORA_TRAIN_LAUNCHER" {TOY} "$1"',
        "UORA_DONE_FILE": str(out / "DONE"),
        "UORA_PREEMPTED_FILE": str(out / "PREEMPTED"),
        "UORA_RESIGNAL_S": "1",  # the stand-in trains for seconds, not hours
        "TOY_STEPS": STEPS,
        "TOY_STEP_SECONDS": "0.1",
        **extra,
    }


def submit(cluster: SlurmCluster, out: Path, cwd: Path, *sbatch_args: str, **env: str) -> str:
    return cluster.sbatch(
        *sbatch_args, "--gpus-per-node=0", str(TRAIN_SH), str(out), cwd=cwd, env=toy_env(out, **env)
    )


def rank_records(out: Path) -> list[dict]:
    return [
        json.loads(line) for path in sorted(out.glob("ranks.*")) for line in path.read_text().splitlines()
    ]


def standalone_result(out: Path, steps: str) -> dict:
    """The same stand-in training without Slurm: one standalone torchrun with 2 processes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "TOY_STEPS": steps, "TOY_STEP_SECONDS": "0"}
    subprocess.run([*command, str(TOY), str(out)], env=env, check=True, capture_output=True, timeout=120)
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return standalone_result(tmp_path_factory.mktemp("toy-reference"), STEPS)


def wait_until_started(cluster: SlurmCluster, job_id: str, timeout: float = 60) -> None:
    """Until the batch script has logged its first line (its traps are set by then)."""
    deadline = time.monotonic() + timeout
    while f"job {job_id} (restart 0" not in cluster.job(job_id).log_text():
        assert time.monotonic() < deadline, f"job {job_id} did not start"
        time.sleep(0.1)


def test_early_usr1_checkpoints_requeues_and_resumes_bit_identically(
    slurm_cluster: SlurmCluster, tmp_path: Path, reference
):
    """SIGUSR1 to the batch shell as soon as the job runs, while the workers are still importing
    torch (no handler yet; torchrun ignores it): the shell repeats it until they stop, so the
    warning is not lost. Then: checkpoint, self-requeue, resume, DONE, identical result."""
    out = tmp_path / "out"
    job_id = submit(slurm_cluster, out, tmp_path)
    # A job that depends on the training (as in `pipeline.sh --chain`) must wait through the requeue.
    after = slurm_cluster.sbatch(
        f"--dependency=afterok:{job_id}", "--kill-on-invalid-dep=yes", "--gpus-per-node=0", "--nodes=1",
        f"--output={tmp_path / 'after.out'}", "--wrap", f"test -f {out / 'DONE'} && echo trained",
        cwd=tmp_path,
    )  # fmt: skip
    wait_until_started(slurm_cluster, job_id)
    assert not list(out.glob("ranks.*"))  # the workers have not started training yet
    assert slurm_cluster.run("scancel", "--batch", "--signal=USR1", job_id).returncode == 0
    job = slurm_cluster.wait(job_id)
    log = job.log_text()
    assert (job.state, job.exit_code, job.restarts) == ("COMPLETED", "0:0", 1), log
    assert slurm_cluster.wait(after).state == "COMPLETED"
    assert (tmp_path / "after.out").read_text() == "trained\n"
    assert "SIGUSR1: asking the training workers to checkpoint" in log
    assert "requeueing job" in log and "(restart 1 of at most 20)" in log  # one log, appended
    assert "0: node 0" in log and "1: node 1" in log  # one torchrun per node, every start
    records = rank_records(out)
    # Two ranks on two Slurm nodes; c10d may give rank 0 to either node, so writers check RANK.
    assert {(r["rank"], r["world"]) for r in records} == {(0, 2), (1, 2)}
    assert {r["node"] for r in records} == {"0", "1"}
    starts = {(r["restart"], r["start"]) for r in records}
    resumed_at = max(start for _, start in starts)
    assert resumed_at < int(STEPS) and starts == {("0", 0), ("1", resumed_at)}, starts
    assert (out / "DONE").is_file() and not (out / "PREEMPTED").exists()
    assert json.loads((out / "result.json").read_text()) == reference


def test_time_limit_signal_to_batch_shell_restart_cap_then_resume_by_hand(
    slurm_cluster: SlurmCluster, tmp_path: Path
):
    """The production path: Slurm itself signals before the time limit. Here `--signal=B:USR1`
    (to the batch shell, which passes it on to the workers), a 1-minute limit, and no restarts
    allowed: the job stops with a checkpoint and says how to resume; resubmitting resumes."""
    out, steps = tmp_path / "out", "300"
    job_id = submit(
        slurm_cluster, out, tmp_path, "--time=1", "--signal=B:USR1@55",
        UORA_MAX_RESTARTS="0", TOY_STEPS=steps, TOY_STEP_SECONDS="0.2",
    )  # fmt: skip
    reference = standalone_result(tmp_path / "reference", steps)
    job = slurm_cluster.wait(job_id, timeout=120)
    log = job.log_text()
    assert (job.state, job.exit_code, job.restarts) == ("FAILED", "3:0", 0), log
    assert "SIGUSR1: asking the training workers to checkpoint" in log
    assert "resubmit the same command to resume" in log
    assert (out / "checkpoint.pt").is_file() and not (out / "DONE").exists()
    # By hand: the same command again resumes from the checkpoint.
    job_id = submit(slurm_cluster, out, tmp_path, TOY_STEPS=steps, TOY_STEP_SECONDS="0")
    job = slurm_cluster.wait(job_id)
    assert (job.state, job.exit_code) == ("COMPLETED", "0:0"), job.log_text()
    # Two runs of two ranks; the second started from the checkpoint (step 0 if the warning came
    # while the workers were still starting up: the repeated signal stopped them at once).
    records = rank_records(out)
    assert len(records) == 4 and max(r["start"] for r in records) < int(steps), records
    assert json.loads((out / "result.json").read_text()) == reference


def test_failure_is_not_requeued_and_keeps_its_exit_status(slurm_cluster: SlurmCluster, tmp_path: Path):
    out = tmp_path / "out"
    job = slurm_cluster.wait(submit(slurm_cluster, out, tmp_path, TOY_FAIL_AT="2"))
    log = job.log_text()
    status = job.exit_code.split(":")[0]
    # srun reports the worst task: 1 from the crashed rank, or 143 from the peer it then killed.
    assert (job.state, job.restarts) == ("FAILED", 0) and status in ("1", "143"), log
    assert "toy failure at step 2" in log
    assert f"training failed (exit status {status})" in log and not (out / "DONE").exists()
    assert "plan skipped: no GPUs in this allocation (CPU nodes)" in log  # the pre-flight plan is GPU-only


def test_pipeline_chain_submits_dependent_jobs(slurm_cluster: SlurmCluster, tmp_path: Path):
    """`slurm/pipeline.sh --chain`: prepare (1 node) -> train (all nodes) -> finish (1 node), linked
    by afterok. Submitted on hold, so only the wiring is checked here (the parts run in
    test_slurm_pipeline.py and test_dependent_job_waits_through_a_requeue)."""
    done = slurm_cluster.run(
        "bash", str(REPO_ROOT / "slurm" / "pipeline.sh"), "--chain", "--hold", "--gpus-per-node=0",
        "--nodes=2", "--", "cfg.yaml", "run.name=x",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    ids = dict(line.split() for line in done.stdout.splitlines())
    assert list(ids) == ["prepare", "train", "finish"]
    try:
        records = {part: slurm_cluster.record(job_id) for part, job_id in ids.items()}
        assert [records[p]["NumNodes"] for p in ids] == ["1-1", "2-2", "1-1"]  # min-max while pending
        assert records["prepare"]["Dependency"] == "(null)"
        assert records["train"]["Dependency"].startswith(f"afterok:{ids['prepare']}")
        assert records["finish"]["Dependency"].startswith(f"afterok:{ids['train']}")
        assert records["train"]["Command"] == str(TRAIN_SH)
        assert records["finish"]["Command"] == str(REPO_ROOT / "slurm" / "pipeline.sh")
        assert all(records[p]["JobState"] == "PENDING" for p in ids)
    finally:
        slurm_cluster.run("scancel", *ids.values())


def test_train_sh_without_config_fails_with_usage(slurm_cluster: SlurmCluster, tmp_path: Path):
    job = slurm_cluster.wait(
        slurm_cluster.sbatch("--gpus-per-node=0", "--nodes=1", str(TRAIN_SH), cwd=tmp_path)
    )
    assert (job.state, job.exit_code) == ("FAILED", "2:0")
    assert "usage: sbatch [sbatch options] slurm/train.sh CONFIG [key=value ...]" in job.log_text()
