"""A stand-in training worker for the Slurm tests: small, fast, and exact.

Run under torchrun (gloo). It trains a linear least-squares model with gradients all-reduced
across ranks, exactly like a data-parallel trainer, and follows the train stage's preemption
contract: SIGUSR1/SIGTERM set a flag that is all-reduced every step (so a signal that reached
only some ranks still stops all of them at the same step); the ranks then save a checkpoint and
exit 0 *without* writing DONE. A rerun resumes from the checkpoint; global rank 0 writes the
result and then DONE, last. Data are a pure function of (step, rank), so a resumed run produces
a bit-identical result to an uninterrupted one.

    python -m torch.distributed.run ... tests/slurm/toy_worker.py OUT_DIR

Environment: TOY_STEPS (default 30), TOY_STEP_SECONDS (default 0.05, to leave time to signal),
TOY_FAIL_AT (a step at which rank 0 crashes, to test that failures are not requeued).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

DIM = 8


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(16, DIM, generator=gen, dtype=torch.float64)
    true_w = torch.arange(1, DIM + 1, dtype=torch.float64)
    return x, x @ true_w + 0.01 * torch.randn(16, generator=gen, dtype=torch.float64)


def quiet_signals() -> None:
    """Past the stop decision (or the last step) a repeated warning means nothing; ignore it,
    because during interpreter shutdown Python's own handler is gone and SIGUSR1 would kill us."""
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def main() -> int:
    out = Path(sys.argv[1])
    steps = int(os.environ.get("TOY_STEPS", "30"))
    pause = float(os.environ.get("TOY_STEP_SECONDS", "0.05"))
    fail_at = int(os.environ.get("TOY_FAIL_AT", "-1"))
    flag = {"signal": None}

    def on_signal(signum: int, _frame: object) -> None:
        flag["signal"] = signal.Signals(signum).name

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, on_signal)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    # Global RANK (not LOCAL_RANK / SLURM_NODEID) decides who writes: with c10d rendezvous the
    # first node is not necessarily rank 0.
    is_writer = int(os.environ["RANK"]) == 0
    ckpt = out / "checkpoint.pt"
    w, start = torch.zeros(DIM, dtype=torch.float64), 0
    if ckpt.is_file():
        state = torch.load(ckpt)
        w, start = state["w"], state["step"]
    out.mkdir(parents=True, exist_ok=True)
    with (out / f"ranks.{rank}").open("a") as log:
        log.write(
            json.dumps(
                {
                    "rank": rank,
                    "world": world,
                    "host": socket.gethostname(),
                    "node": os.environ.get("SLURM_NODEID"),
                    "start": start,
                    "restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
                }
            )
            + "\n"
        )

    for step in range(start, steps):
        stop = torch.tensor([1.0 if flag["signal"] else 0.0])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop.item():
            quiet_signals()
            if is_writer:
                tmp = out / "checkpoint.pt.tmp"
                torch.save({"w": w, "step": step}, tmp)
                tmp.replace(ckpt)
                (out / "PREEMPTED").write_text(f"{flag['signal'] or 'peer'} at step {step}\n")
                print(f"preempted at step {step}: checkpoint saved", flush=True)
            dist.barrier()
            dist.destroy_process_group()
            return 0
        if step == fail_at and rank == 0:
            raise RuntimeError(f"toy failure at step {step}")
        x, y = batch(step, rank)
        grad = 2 * x.T @ (x @ w - y) / len(y)
        dist.all_reduce(grad)
        w = w - 0.05 * grad / world
        if is_writer:
            (out / "progress").write_text(str(step + 1))
        time.sleep(pause)

    quiet_signals()
    dist.barrier()
    if is_writer:
        (out / "PREEMPTED").unlink(missing_ok=True)
        (out / "result.json").write_text(json.dumps({"w": [v.hex() for v in w.tolist()], "world": world}))
        (out / "DONE").write_text("done\n")  # last
        print(f"finished {steps} steps, world size {world}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
