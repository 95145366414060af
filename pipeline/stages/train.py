"""The 'train' stage: prepared chat data -> a PEFT adapter (UORA, LoRA or VeRA) via TRL's SFTTrainer, with
``train_worker``'s recipe in this process (one process, no DeepSpeed) or under ``torchrun`` (forwarding
SIGTERM/SIGUSR1 so workers checkpoint). Resuming needs no flag: ``ctx.work_dir`` keeps its checkpoints."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import config_slice, to_yaml
from pipeline.digests import digest_of, sha256
from pipeline.stages.base import StageContext, StageError, StagePreempted, StageResult
from pipeline.tracking import active_mlflow

NAME = "train"
INPUTS: tuple[str, ...] = ("prepare",)
CONFIG_SECTIONS: tuple[str, ...] = ("run", "model", "adapter", "train")

LAUNCHER_ENV = "UORA_TRAIN_LAUNCHER"  # set by slurm/train.sh: multi-node worker launcher


def run(ctx: StageContext) -> StageResult:
    from pipeline.stages import train_worker as worker

    work_dir, tcfg = ctx.work_dir, ctx.config.train
    in_main = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
    caller_sigterm = signal.getsignal(signal.SIGTERM) if in_main else None  # see the end of training
    if ctx.force and work_dir.exists():
        shutil.rmtree(work_dir)  # --force: start over instead of resuming
    work_dir.mkdir(parents=True, exist_ok=True)
    # The exact config (what was set: it re-validates and reloads as is), and the resolved one for reading.
    config_dump = ctx.config.model_dump(mode="json", exclude_unset=True)
    (work_dir / "config.yaml").write_text(yaml.safe_dump(config_dump, sort_keys=False), encoding="utf-8")
    (work_dir / "config_resolved.yaml").write_text(to_yaml(ctx.config), encoding="utf-8")
    prepared, mlflow = ctx.input_dir("prepare"), ctx.mlflow_run_id and active_mlflow()  # the child run
    spec = {"work_dir": str(work_dir.resolve()), "dataset_dir": str((prepared / "dataset").resolve()),
            "identity": _identity(ctx.config, prepared), "config": config_dump,
            "mlflow_run_id": ctx.mlflow_run_id, "mlflow_tracking_uri": mlflow and mlflow.get_tracking_uri()}
    if tcfg.deepspeed:  # workers may run from another folder
        spec["config"]["train"]["deepspeed"] = str(Path(tcfg.deepspeed).resolve())
    spec_path = work_dir / "train_spec.json"
    same_attempt = False
    with contextlib.suppress(OSError, ValueError):
        same_attempt = json.loads(spec_path.read_text(encoding="utf-8")).get("identity") == spec["identity"]
    if not same_attempt:  # checkpoints of another config or other data must not be resumed
        shutil.rmtree(work_dir / worker.CHECKPOINTS, ignore_errors=True)
        (work_dir / worker.DONE).unlink(missing_ok=True)
    (work_dir / worker.PREEMPTED).unlink(missing_ok=True)
    spec_path.write_text(json.dumps(spec, indent=2), encoding="utf-8")

    if (work_dir / worker.DONE).is_file():  # an earlier attempt saved everything, then stopped short
        code = 0
    elif tcfg.nproc_per_node == 1 and not tcfg.deepspeed and not os.environ.get(LAUNCHER_ENV):
        code = worker.train(spec)  # its StageError is the stage's
    else:  # torchrun passes the signals on to every worker
        proc = subprocess.Popen(torchrun_command(spec_path, tcfg), env=worker_env(tcfg))
        try:
            with worker.handling_signals(lambda signum, _frame: proc.send_signal(signum),
                                         (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)):  # fmt: skip
                code = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()

    if (preempted := work_dir / worker.PREEMPTED).is_file():
        info = json.loads(preempted.read_text())
        if info["signal"] == "SIGTERM" and callable(caller_sigterm):
            # The checkpoint is safe; now let the caller's own SIGTERM handler (the driver's: close the
            # MLflow run as KILLED, keep the .partial folder, exit 143) see the signal training intercepted.
            os.kill(os.getpid(), signal.SIGTERM)
        raise StagePreempted(f"training preempted ({info['signal']}) at step {info['step']}; checkpoint "
                             f"saved in {info['checkpoint']}; rerun the same command to resume")
    if code != 0 or not (work_dir / worker.DONE).is_file():
        raise StageError(f"training failed (exit status {code}); see the log above and {work_dir}")

    if mlflow:
        for name in (worker.LOSS_PNG, "config.yaml", worker.METRICS):
            if (work_dir / name).is_file():
                mlflow.log_artifact(str(work_dir / name))
    # Checkpoints are for resuming only; the finished stage keeps the adapter, not GBs of state.
    shutil.rmtree(work_dir / worker.CHECKPOINTS, ignore_errors=True)
    shutil.rmtree(work_dir / "pids", ignore_errors=True)
    return StageResult(
        metrics=json.loads((work_dir / worker.METRICS).read_text()),
        outputs={"adapter": worker.ADAPTER, "config": "config.yaml", "metrics": worker.METRICS,
                 "loss_curve": worker.LOSS_PNG},
        extra={"adapter_method": ctx.config.adapter.method, "nproc_per_node": tcfg.nproc_per_node},
    )


def summary(metrics: dict[str, float]) -> str:
    """The stage's result line: steps, held-out loss before → after (the mean over sources), time."""
    line = f"{metrics.get('global_step', 0):.0f} steps in {metrics.get('train_runtime_s', 0):.0f} s"
    if "eval_loss_after" in metrics:
        before = f"{metrics['eval_loss_before']:.3f} → " if "eval_loss_before" in metrics else ""
        line += f", held-out loss {before}{metrics['eval_loss_after']:.3f}"
    return line


def _identity(config: Any, prepare_dir: Path) -> str:
    """What a checkpoint depends on: the config slice training reads (the driver's) and the prepared
    data, nothing else: editing an eval-only setting of a preempted run must not delete its training."""
    files = [prepare_dir / name for name in ("manifest.json", "dataset/dataset_dict.json")]
    data = [path.read_bytes() for path in files if path.is_file()]
    return sha256(digest_of(config_slice(config, CONFIG_SECTIONS)), *data)


def cpu_threads(nproc: int, requested: int | None = None) -> int:
    """Threads per CPU worker: the request, else the usable cores split evenly between processes (N
    workers each using every core, torch's default, make CPU training several times slower)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return requested or max(1, cores // nproc)


def worker_env(tcfg: Any) -> dict[str, str]:
    """Environment for torchrun workers: our code first on the path, sane CPU threading."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return {"TOKENIZERS_PARALLELISM": "false", **os.environ, "PYTHONPATH": path,
            "OMP_NUM_THREADS": str(cpu_threads(tcfg.nproc_per_node, tcfg.omp_num_threads))}


def torchrun_command(spec_path: Path, tcfg: Any) -> list[str]:
    """``torchrun`` for one node, forwarding SIGUSR1 too (by default it would kill torchrun itself);
    workers get ``preempt_grace_s`` to checkpoint. With ``$UORA_TRAIN_LAUNCHER`` set (slurm/launch.sh:
    one torchrun per node of the allocation), that launcher starts the same worker command."""
    worker = ["-m", "pipeline.stages.train_worker", str(spec_path)]
    if launcher := os.environ.get(LAUNCHER_ENV):
        return [launcher, *worker]
    # torchrun learnt --shutdown_timeout after torch 2.11 (which rejects it: the GPU kit found this);
    # older ones give workers their fixed 30 s to checkpoint.
    grace = [f"--shutdown_timeout={tcfg.preempt_grace_s}"] if _torchrun_knows("--shutdown_timeout") else []
    nproc = f"--nproc_per_node={tcfg.nproc_per_node}"
    signals = "--signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", nproc, signals, *grace, *worker]


def _torchrun_knows(option: str) -> bool:
    """Whether this torch's torchrun accepts ``option`` (its options change between releases)."""
    from torch.distributed.run import get_args_parser

    return any(option in action.option_strings for action in get_args_parser()._actions)
