"""UoraReinitCallback inside an HF Trainer: events logged, and interrupt + resume == uninterrupted."""

from __future__ import annotations

import torch
from peft import get_peft_model
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments
from uora_helpers import adapter_state

import uora
from uora import UoraConfig, UoraReinitCallback


class RandomTokens(Dataset):
    def __init__(self, n: int = 24, length: int = 12, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.rows = torch.randint(0, 128, (n, length), generator=gen)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


class StopAt(TrainerCallback):
    """Simulates an interruption right after the checkpoint of step `step` is written."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _model(tiny_llama):
    # τ = 0.05 with lr 1e-3: a slot planted at 0 stays dead for many steps, so events fire every step
    cfg = UoraConfig(r=8, target_modules="all-linear", reinit_threshold=0.05, reinit_target="resample")
    model = get_peft_model(tiny_llama(seed=0), cfg)
    with torch.no_grad():
        model.base_model.uora_layers("default")[4].uora_lambda_d["default"][3] = 0.0
        model.base_model.uora_layers("default")[9].uora_lambda_d["default"][6] = 0.0
    return model


def _args(out_dir, **kwargs) -> TrainingArguments:
    defaults = dict(
        output_dir=str(out_dir),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_steps=3,
        save_strategy="steps",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    defaults.update(kwargs)
    return TrainingArguments(**defaults)


def _train(tiny_llama, out_dir, stop_at=None, resume=None):
    model = _model(tiny_llama)
    callbacks = [UoraReinitCallback()] + ([StopAt(stop_at)] if stop_at else [])
    trainer = Trainer(model=model, args=_args(out_dir), train_dataset=RandomTokens(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model


def test_events_reach_the_trainer_logs(tiny_llama, tmp_path):
    trainer, model = _train(tiny_llama, tmp_path)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 6
    assert all("uora/reinit_events" in entry for entry in logs)
    # two planted slots, dead at every one of the 6 checks: 2 events per step
    assert [entry["uora/reinit_events"] for entry in logs] == [2] * 6
    assert logs[-1]["uora/reinit_events_total"] == 12 == uora.total_reinit_events(model)


def test_interrupted_and_resumed_run_ends_with_the_same_adapter(tiny_llama, tmp_path):
    _, full = _train(tiny_llama, tmp_path / "full")
    _, first_half = _train(tiny_llama, tmp_path / "resumed", stop_at=3)
    assert first_half.base_model.uora_reinit_counts["default"].sum() == 6
    _, resumed = _train(tiny_llama, tmp_path / "resumed", resume=str(tmp_path / "resumed" / "checkpoint-3"))
    expected, got = adapter_state(full), adapter_state(resumed)
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, different
    assert resumed.base_model.uora_reinit_draws["default"].item() == 6
    # and the projections really moved during training
    fresh = _model(tiny_llama)
    assert not torch.equal(fresh.base_model.uora_A["default"], resumed.base_model.uora_A["default"])


def test_attach_puts_the_callback_first(tiny_llama, tmp_path):
    trainer = Trainer(
        model=_model(tiny_llama), args=_args(tmp_path, max_steps=1), train_dataset=RandomTokens()
    )
    callback = UoraReinitCallback.attach(trainer)
    assert trainer.callback_handler.callbacks[0] is callback
