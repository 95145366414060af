"""Process plumbing of the train stage: preemption flag, checkpoint discovery, worker launch."""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import pytest

from pipeline.stages import train
from pipeline.stages.train_worker import (
    PREEMPT_SIGNALS,
    PreemptionCallback,
    handling_signals,
    last_complete_checkpoint,
    training_args_for_device,
)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_sets_flag_and_callback_stops_with_a_checkpoint(sig):
    before = signal.getsignal(sig)
    callback = PreemptionCallback()
    with handling_signals(callback.handle, PREEMPT_SIGNALS):
        control = SimpleNamespace(should_save=False, should_training_stop=False)
        callback.on_step_end(None, SimpleNamespace(global_step=3), control)
        assert not control.should_save and callback.stopped_at is None
        os.kill(os.getpid(), sig)
        assert callback.signal_name == sig.name
        callback.on_step_end(None, SimpleNamespace(global_step=4), control)
        assert control.should_save and control.should_training_stop
        assert callback.stopped_at == 4 and callback.signal_name == sig.name
    assert signal.getsignal(sig) == before


def test_last_complete_checkpoint_ignores_half_written_ones(tmp_path):
    assert last_complete_checkpoint(tmp_path / "none") is None
    for step, complete in ((5, True), (10, True), (15, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert (tmp_path / "checkpoint-15").is_dir()  # deleted only when asked
    assert last_complete_checkpoint(tmp_path, remove_incomplete=True) == tmp_path / "checkpoint-10"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-5", "checkpoint-x"]


def test_cpu_threads_split_cores_between_workers():
    cores = len(os.sched_getaffinity(0))
    assert train.cpu_threads(1) == cores
    assert train.cpu_threads(cores * 4) == 1
    assert train.cpu_threads(2, requested=3) == 3


def test_gpu_hosts_get_no_cpu_workaround_and_ddp_never_broadcasts_buffers():
    """DDP's per-step buffer broadcast is off on every host (the ranks' projections agree without it:
    test_distributed checks both ranks' A/B after training)."""
    off = {"ddp_broadcast_buffers": False}
    assert training_args_for_device(use_cpu=False, deepspeed=True) == off
    assert training_args_for_device(use_cpu=False, deepspeed=False) == off
    assert training_args_for_device(use_cpu=True, deepspeed=False) == {**off, "use_cpu": True}


def test_torchrun_forwards_sigusr1_and_slurm_launcher_replaces_it(tmp_path, monkeypatch):
    tcfg = SimpleNamespace(nproc_per_node=2, preempt_grace_s=120, omp_num_threads=None)
    monkeypatch.delenv(train.LAUNCHER_ENV, raising=False)
    command = train.torchrun_command(tmp_path / "spec.json", tcfg)
    assert "--nproc_per_node=2" in command and "--shutdown_timeout=120" in command
    # a torchrun that does not know --shutdown_timeout (torch 2.11) must not be given it
    monkeypatch.setattr(train, "_torchrun_knows", lambda option: False)
    assert not any(
        arg.startswith("--shutdown_timeout") for arg in train.torchrun_command(tmp_path / "s", tcfg)
    )
    monkeypatch.undo()
    monkeypatch.delenv(train.LAUNCHER_ENV, raising=False)
    assert any(arg.startswith("--signals_to_handle=") and "SIGUSR1" in arg for arg in command)
    assert command[-3:] == ["-m", "pipeline.stages.train_worker", str(tmp_path / "spec.json")]
    monkeypatch.setenv(train.LAUNCHER_ENV, "/x/slurm/launch.sh")
    assert train.torchrun_command(tmp_path / "spec.json", tcfg) == [
        "/x/slurm/launch.sh",
        "-m",
        "pipeline.stages.train_worker",
        str(tmp_path / "spec.json"),
    ]
    env = train.worker_env(tcfg)
    assert env["OMP_NUM_THREADS"] == str(train.cpu_threads(2))


def test_a_missing_prepared_dataset_is_one_line(tmp_path):
    """The worker names the folder and the stage to run, instead of datasets' FileNotFoundError."""
    from pipeline.errors import StageError
    from pipeline.stages.train_worker import _datasets

    with pytest.raises(StageError, match=r"prepared dataset not found: .*run the 'prepare' stage first"):
        _datasets(tmp_path / "dataset", None, completion_only=False)
