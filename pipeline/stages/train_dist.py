"""Process-level plumbing for training: CPU distribution workarounds, preemption, checkpoints.

Kept apart from the training recipe (``train_worker``) because none of it is about the model:
it is about how N processes agree on devices, on stopping, and on where to resume.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def rank() -> int:
    """Global rank of this process (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0"))


def cpu_threads(nproc: int, requested: int | None = None) -> int:
    """Threads per CPU worker: the request, else the usable cores split evenly between processes.

    Oversubscription (each of N workers using every core, torch's default) makes CPU training
    several times slower, so workers always get an explicit OMP_NUM_THREADS.
    """
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, nproc))


def training_args_for_device(use_cpu: bool, deepspeed: bool) -> dict[str, Any]:
    """Extra ``TrainingArguments`` so that N processes form ONE distributed training.

    Everywhere: ``ddp_broadcast_buffers=False``. DDP would broadcast every buffer from rank 0 before
    each forward: UORA's shared projections, ~90 MB a step for Llama-2-7B at r=1024 against ~6 MB of
    d/b gradients. The ranks agree without it: ``UoraReinitCallback`` broadcasts A/B once at train
    start and the re-init rule then writes the same values on every rank (see ``uora.reinit``).

    On GPU hosts nothing else: accelerate detects NCCL/DeepSpeed from torchrun's env itself.

    On CPU two upstream behaviours need handling (accelerate 1.15, ``PartialState.__init__`` in
    ``accelerate/state.py``):

    * without ``use_cpu`` accelerate finds no CUDA, picks no backend and sets
      ``num_processes = 1``: torchrun's N workers each run an *independent* training. Fix: pass
      ``use_cpu=True`` (accelerate's MULTI_CPU path, gloo) — the supported way.
    * with DeepSpeed, ``use_cpu=True`` skips DeepSpeed's distributed init and never marks the
      state as DEEPSPEED, while ``use_cpu=False`` initialises DeepSpeed but again reports one
      process, so HF computes ``train_batch_size`` for world size 1 and DeepSpeed's batch-size
      assertion (micro x accumulation x world) fails. WORKAROUND: initialise DeepSpeed's comm on
      gloo ourselves, build the shared ``PartialState`` through the MULTI_CPU path (correct world
      size), mark it DEEPSPEED, and let the Trainer reuse it (``use_configured_state``, accelerate's
      documented hook for a pre-built state). Remove when accelerate handles CPU DeepSpeed.
      With that state ``use_cpu`` no longer picks the backend; it stays True because
      ``TrainingArguments`` refuses ``bf16`` without it on a host with no bf16 GPU ("Your setup
      doesn't support bf16/gpu"), while DeepSpeed's bf16 engine works on CPU with torch's bf16.
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


# --------------------------------------------------------------------------------------------
# preemption
# --------------------------------------------------------------------------------------------
class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1 in this process; ``agreed()`` is the all-ranks OR of the flag."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> PreemptionFlag:
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only; the caller handles them
        for sig in PREEMPT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: Any) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def agreed(self) -> bool:
        """All-reduce (MAX) of the local flag, so a signal that reached only some ranks stops all
        of them at the same step (otherwise the others would hang in the next collective)."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.requested
        device = "cpu"
        if "nccl" in str(dist.get_backend()):
            device = f"cuda:{torch.cuda.current_device()}"
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class PreemptionCallback(TrainerCallback):
    """After every optimizer step: if any rank was signalled, checkpoint and stop training."""

    def __init__(self, flag: PreemptionFlag) -> None:
        self.flag = flag
        self.stopped_at: int | None = None
        self.signal_name: str | None = None  # the signal, whichever rank received it

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.flag.agreed():
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
            self.signal_name = next((name for name in all_gather(self.flag.signal_name) if name), None)
        return control


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The highest-step ``checkpoint-N`` holding ``trainer_state.json`` (written last by the
    Trainer, so its presence means the checkpoint is complete)."""
    if not folder.is_dir():
        return None
    found = [
        (int(m.group(1)), p)
        for p in folder.iterdir()
        if (m := _CHECKPOINT.match(p.name)) and (p / "trainer_state.json").is_file()
    ]
    return max(found)[1] if found else None


def remove_incomplete_checkpoints(folder: Path) -> list[Path]:
    """Delete checkpoints a crash left half-written (no ``trainer_state.json``); rank 0 only."""
    removed = []
    if folder.is_dir():
        for p in folder.iterdir():
            if _CHECKPOINT.match(p.name) and not (p / "trainer_state.json").is_file():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
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
