"""Process-level plumbing for training: how N processes agree on devices, on stopping, and on
where to resume. Kept apart from the recipe (``train_worker``): none of it is about the model."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import sort_checkpoints

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def rank() -> int:
    """Global rank of this process (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0"))


def cpu_threads(nproc: int, requested: int | None = None) -> int:
    """Threads per CPU worker: the request, else the usable cores split evenly between processes
    (each of N workers using every core, torch's default, makes CPU training several times slower)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return requested or max(1, cores // nproc)


def training_args_for_device(use_cpu: bool, deepspeed: bool) -> dict[str, Any]:
    """Extra ``TrainingArguments`` so that N processes form ONE distributed training (README,
    "Several processes, DeepSpeed").

    Everywhere ``ddp_broadcast_buffers=False``: DDP would broadcast UORA's shared projections from
    rank 0 before each forward (~90 MB a step for Llama-2-7B at r=1024). The ranks agree without it:
    ``UoraReinitCallback`` broadcasts A/B once at train start and re-init writes the same values on
    every rank. GPU hosts need nothing else (accelerate detects NCCL/DeepSpeed from torchrun's env).

    On CPU (accelerate 1.15, ``PartialState.__init__``): without ``use_cpu`` accelerate picks no
    backend and each of torchrun's workers trains alone, so ``use_cpu=True`` (MULTI_CPU, gloo). With
    DeepSpeed that skips DeepSpeed's init, while ``use_cpu=False`` reports world size 1 and DeepSpeed's
    batch-size assertion fails. WORKAROUND (remove when accelerate handles CPU DeepSpeed): init
    DeepSpeed's comm on gloo, build the shared ``PartialState`` through MULTI_CPU (right world size),
    mark it DEEPSPEED and let the Trainer reuse it (``use_configured_state``). ``use_cpu`` stays True:
    ``TrainingArguments`` refuses ``bf16`` without it on a host with no bf16 GPU, while DeepSpeed's
    bf16 engine works on CPU.
    """
    common: dict[str, Any] = {"ddp_broadcast_buffers": False}
    if not use_cpu:
        return common
    if not deepspeed:
        return {**common, "use_cpu": True}
    import deepspeed.comm as ds_comm
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    if os.environ.get("UORA_DS_SHM_COMM", "0") != "1":
        # DeepSpeed JIT-compiles a shared-memory all-reduce op on first CPU init (~100 s on two
        # cores, per machine); plain gloo is exact and enough for CPU runs. The dict is
        # DeepSpeed's own cache of op compatibility (deepspeed/ops/__init__.py), edits persist.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not ds_comm.is_initialized():
        ds_comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    state = PartialState(cpu=True, backend="gloo")
    state.distributed_type = DistributedType.DEEPSPEED
    return {**common, "use_cpu": True, "accelerator_config": {"use_configured_state": True}}


@contextlib.contextmanager
def handling_signals(handler: Callable[[int, Any], Any], signals: tuple[int, ...]) -> Iterator[None]:
    """``handler`` for ``signals`` inside the block, the previous handlers again after it. Python
    delivers signals to the main thread only; elsewhere the caller's own handlers stay in place."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class PreemptionCallback(TrainerCallback):
    """``handle`` is the SIGTERM/SIGUSR1 handler. After every optimizer step the ranks OR their
    flags, so a signal that reached only some ranks stops all of them at the same step (otherwise
    the others would hang in the next collective): checkpoint, then stop."""

    def __init__(self) -> None:
        self.signal_name: str | None = None  # this rank's signal; once stopped, whichever rank's
        self.stopped_at: int | None = None

    def handle(self, signum: int, _frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if _any_rank(self.signal_name is not None):
            control.should_save = control.should_training_stop = True
            self.stopped_at = state.global_step
            self.signal_name = next((name for name in all_gather(self.signal_name) if name), None)
        return control


def _any_rank(flag: bool) -> bool:
    """The all-ranks OR of ``flag``: a MAX all-reduce (on this rank's GPU under NCCL)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    device = f"cuda:{torch.cuda.current_device()}" if "nccl" in str(dist.get_backend()) else "cpu"
    value = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The highest-step ``checkpoint-N`` holding ``trainer_state.json`` (written last by the
    Trainer, so its presence means the checkpoint is complete)."""
    complete = [path for path in sort_checkpoints(str(folder)) if Path(path, "trainer_state.json").is_file()]
    return Path(complete[-1]) if complete else None


def remove_incomplete_checkpoints(folder: Path) -> list[Path]:
    """Delete checkpoints a crash left half-written (no ``trainer_state.json``); rank 0 only."""
    removed = [Path(p) for p in sort_checkpoints(str(folder)) if not Path(p, "trainer_state.json").is_file()]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def all_gather(value: Any) -> list[Any]:
    """Every rank's ``value`` (a picklable object), in rank order; ``[value]`` when not distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
