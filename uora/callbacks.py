"""`UoraReinitCallback`: applies UORA re-initialisation after every optimizer step of an HF Trainer.

`on_step_end` runs once per optimizer step (after gradient accumulation and the optimizer update,
before logging and checkpointing), so the check sees the updated d, a recomputed forward under
gradient checkpointing sees the same A/B, and a checkpoint written at step s includes step s's
re-initialisation.

The callback itself holds no state that matters for exactness: counters, resample draws and the
projections are buffers of the adapter and ride in the checkpoint's adapter weights (see
`uora.reinit`). It only keeps the number of events since the last log, which it adds to every
training log as `uora/reinit_events` (and the exact running total as `uora/reinit_events_total`).
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .reinit import reinit_step, sync_projections_from_rank0, total_reinit_events

EVENTS_KEY = "uora/reinit_events"
TOTAL_KEY = "uora/reinit_events_total"


class UoraReinitCallback(TrainerCallback):
    """Run `uora.reinit_step(model)` after each optimizer step and report the events in the logs.

    Trainer calls `on_log` of callbacks in list order, so reporting integrations registered before
    this callback (MLflow, TensorBoard: they come first when passed via `report_to`) would not see
    the added keys. Use `UoraReinitCallback.attach(trainer)`, which puts the callback first, when
    those integrations should report `uora/reinit_events`; the keys always reach
    `trainer.state.log_history`.
    """

    def __init__(self) -> None:
        self.events_since_log = 0

    @classmethod
    def attach(cls, trainer: Any) -> UoraReinitCallback:
        """Create the callback and register it as the trainer's first callback."""
        callback = cls()
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        # after a resume the checkpoint was loaded before this event, so rank 0's A/B are the saved ones
        if model is not None:
            sync_projections_from_rank0(model)

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("UoraReinitCallback needs the model; the Trainer passes it to on_step_end")
        self.events_since_log += reinit_step(model)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        if logs is None or "loss" not in logs:  # only training-step logs
            return
        extra = {EVENTS_KEY: self.events_since_log}
        if model is not None:
            extra[TOTAL_KEY] = total_reinit_events(model)
        self.events_since_log = 0
        logs.update(extra)
        # Trainer appended a copy of `logs` to log_history before calling on_log: keep the two in step
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and "loss" in last:
            last.update(extra)
