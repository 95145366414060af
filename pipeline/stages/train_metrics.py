"""Training metrics: throughput, MLflow logging from global rank 0 only, and the loss-curve plot."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

# Trainer's end-of-training summary (the stage reports its own) and bookkeeping: not logged per step.
_SKIP = {"epoch", "total_flos", "step", "train_loss", "train_runtime", "train_samples_per_second",
         "train_steps_per_second", "train_tokens_per_second"}  # fmt: skip


class MetricsCallback(TrainerCallback):
    """Adds ``tokens_per_second`` and ``seconds_per_step`` to each training log (optimizer steps only:
    evaluation and checkpointing between logs are not training speed) and sends the logs to the
    train stage's MLflow run from rank 0, through ``MlflowClient``: no active run needed, so the same
    code works in-process (the driver's run is active) and in torchrun workers (it is not)."""

    def __init__(
        self, run_id: str | None, tracking_uri: str | None, is_rank0: bool, progress_path: Path | None = None
    ) -> None:
        self.run_id, self.is_rank0, self.progress_path = run_id, is_rank0, progress_path
        self.client = None
        if run_id and is_rank0:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=tracking_uri)
        self.history: list[dict[str, float]] = []
        self._last: tuple[float, int, int] | None = None  # time, tokens, step at the first step or last log
        self._excluded_s = 0.0  # eval/save time since the last log
        self._paused_at: float | None = None  # evaluation and saving run between step end and begin

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        now = time.perf_counter()
        if self._last is None:  # first step of this process (fresh or resumed)
            self._last = (now, state.num_input_tokens_seen, state.global_step)
        if self._paused_at is not None:
            self._excluded_s += now - self._paused_at
            self._paused_at = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._paused_at = time.perf_counter()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        metrics = {k: float(v) for k, v in logs.items()
                   if k not in _SKIP and isinstance(v, (int, float)) and math.isfinite(v)}  # fmt: skip
        if "loss" in logs and self._last is not None:
            now, (then, tokens, step) = time.perf_counter(), self._last
            elapsed = now - then - self._excluded_s
            if elapsed > 0 and state.num_input_tokens_seen > tokens:
                metrics["tokens_per_second"] = (state.num_input_tokens_seen - tokens) / elapsed
            if elapsed > 0 and state.global_step > step:
                metrics["seconds_per_step"] = elapsed / (state.global_step - step)
            self._last, self._excluded_s = (now, state.num_input_tokens_seen, state.global_step), 0.0
            if self._paused_at is not None:  # the pause before this log is not in the next interval
                self._paused_at = now
        if not self.is_rank0 or not metrics:
            return
        self.history.append({**metrics, "step": float(state.global_step)})
        if self.progress_path is not None:  # for people (and tests) watching a run from outside
            staging = self.progress_path.with_suffix(".tmp")
            staging.write_text(json.dumps({"step": state.global_step, "max_steps": state.max_steps}))
            staging.replace(self.progress_path)
        if self.client is not None:
            from mlflow.entities import Metric

            stamp = int(time.time() * 1000)
            batch = [Metric(key, value, stamp, state.global_step) for key, value in metrics.items()]
            self.client.log_batch(self.run_id, metrics=batch)


def plot_loss_curve(log_history: list[dict[str, Any]], path: Path) -> Path | None:
    """The loss figure (see :func:`loss_figure`) as a PNG."""
    if (fig := loss_figure(log_history)) is None:
        return None
    import matplotlib.pyplot as plt

    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def loss_figure(log_history: list[dict[str, Any]]) -> Any:
    """Train loss against optimizer step; with held-out losses per source, a second panel shows each
    relative to its first value (sources differ in scale: a 4.4 would flatten a 1.2 on one axis),
    labelled with its absolute first → last. Legends sit outside the curves. None without losses."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals: dict[str, list[tuple[int, float]]] = {}  # "eval" or one curve per eval source
    for entry in log_history:
        for key, value in entry.items():
            found = re.fullmatch(r"eval_(?:(.+)_)?loss", key)
            if found and "step" in entry:
                evals.setdefault(found.group(1) or "eval", []).append((entry["step"], value))
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_source = len(evals) > 1
    fig, axes = plt.subplots(1, 2 if per_source else 1, figsize=(11 if per_source else 6, 4), dpi=100,
                             squeeze=False)  # fmt: skip
    left = axes[0][0]
    if train:
        left.plot(*zip(*train, strict=True), label="train loss")
    held_out = evals.pop("eval", [])
    if per_source:  # the stage's eval_loss_* metrics: the unweighted mean over sources
        by_step = [dict(points) for points in evals.values()]
        steps = sorted(set.intersection(*(set(points) for points in by_step)))
        held_out = [(step, sum(points[step] for points in by_step) / len(by_step)) for step in steps]
    if held_out:
        left.plot(*zip(*held_out, strict=True), "o-",
                  label="held-out loss" + (" (mean of sources)" if per_source else ""))  # fmt: skip
    left.set(xlabel="optimizer step", ylabel="loss", title="SFT loss")
    if per_source:
        right = axes[0][1]
        for name, points in sorted(evals.items()):
            steps, losses = zip(*points, strict=True)
            right.plot(steps, [loss / losses[0] for loss in losses], "o-",
                       label=f"{name}: {losses[0]:.2f} → {losses[-1]:.2f}")  # fmt: skip
        right.axhline(1.0, color="grey", linewidth=0.8)
        right.set(xlabel="optimizer step", ylabel="loss ÷ its first value", title="held-out loss per source")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize="small", frameon=False)
    fig.tight_layout()
    return fig
