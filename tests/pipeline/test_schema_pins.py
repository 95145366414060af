"""The schema's adapter and train keys are PEFT's and TRL's own: every key exists in the library's
config dataclass under the same name, with the same default, or the difference is listed here with
its reason. pipeline.schema imports neither library (validation stays light), so this is where the
copies are pinned to the installed versions."""

from __future__ import annotations

import dataclasses
from typing import Any, get_args

import pytest

from pipeline.adapters import peft_config_class
from pipeline.schema import ADAPTERS, SFTArgs, TrainConfig

ALL_LINEAR = "every linear layer but lm_head on any architecture (PEFT's None: a per-architecture list)"
ADAPTER_DEFAULTS_OF_OUR_OWN = {
    ("uora", "r"): "one default rank, 64, for every method (UoraConfig: 256)",
    ("lora", "r"): "one default rank, 64, for every method (LoraConfig: 8)",
    ("vera", "r"): "one default rank, 64, for every method (VeraConfig: 256)",
    ("uora", "target_modules"): ALL_LINEAR,
    ("lora", "target_modules"): ALL_LINEAR,
    ("vera", "target_modules"): ALL_LINEAR,
    ("lora", "lora_alpha"): "2 * r, so that the scale alpha/r is 2 at any rank (LoraConfig: 8)",
}
TRAIN_DEFAULTS_OF_OUR_OWN = {
    "learning_rate": "UORA/VeRA train scaling vectors only: their rates are ~100x LoRA's",
    "num_train_epochs": "one epoch, the VeRA/UORA instruction-tuning setup",
    "per_device_train_batch_size": "4 fits a CPU run and a 7B model on one GPU",
    "per_device_eval_batch_size": "4, as training",
    "lr_scheduler_type": "cosine, the papers' schedule",
    "warmup_steps": "3% of the steps (a fraction < 1)",
    "assistant_only_loss": "loss on replies only; the stage supplies templates with generation markers",
    "eval_on_start": "the base model's held-out loss is the baseline of every run",
    "save_steps": "frequent checkpoints: a preempted job loses little",
    "save_total_limit": "bounded disk use",
    "activation_checkpointing": "on, as TRL's SFTConfig default `gradient_checkpointing=True` (transformers'"
    " deprecated alias, which warns) makes it; the field's own default is None",
    "bf16": "float32 unless asked (SFTConfig's None means bf16 whenever fp16 is off)",
}


def _defaults(config_class: type) -> dict[str, Any]:
    return {field.name: field.default if field.default is not dataclasses.MISSING else field.default_factory()
            for field in dataclasses.fields(config_class)}  # fmt: skip


@pytest.mark.parametrize("method", sorted(ADAPTERS))
def test_adapter_keys_are_the_peft_configs_fields_with_their_defaults(method):
    theirs = _defaults(peft_config_class(method))
    for name, field in ADAPTERS[method].model_fields.items():
        if name == "method":
            continue
        assert name in theirs, f"adapter.{name} is not a {peft_config_class(method).__name__} field"
        ours = field.get_default(call_default_factory=True, validated_data={"r": 64})
        if (method, name) in ADAPTER_DEFAULTS_OF_OUR_OWN:
            assert ours != theirs[name], f"{method}.{name} now has PEFT's default: drop the exception"
        else:
            assert ours == theirs[name], (method, name, ours, theirs[name])
    exceptions = {key for m, key in ADAPTER_DEFAULTS_OF_OUR_OWN if m == method}
    assert exceptions <= set(ADAPTERS[method].model_fields)


def test_uora_choices_are_uoraconfigs():
    from uora.config import REINIT_TARGETS
    from uora.init import PROJECTION_INITS

    fields = ADAPTERS["uora"].model_fields
    assert set(get_args(fields["projection_init"].annotation)) == set(PROJECTION_INITS)
    assert set(get_args(fields["reinit_target"].annotation)) == set(REINIT_TARGETS)
    assert "save_projection" not in fields  # UoraConfig refuses False: nothing to choose


def test_train_keys_are_sftconfig_fields_with_their_defaults():
    from trl import SFTConfig

    theirs = _defaults(SFTConfig)
    for name, field in SFTArgs.model_fields.items():
        assert name in theirs, f"train.{name} is not a trl.SFTConfig field"
        if name in TRAIN_DEFAULTS_OF_OUR_OWN:
            assert field.default != theirs[name], f"train.{name} has SFTConfig's default: drop the exception"
        else:
            assert field.default == theirs[name], (name, field.default, theirs[name])
    assert set(TRAIN_DEFAULTS_OF_OUR_OWN) <= set(SFTArgs.model_fields)
    # The pipeline's own keys are kept out of the passthrough; use_cpu shares SFTConfig's name but
    # adds None (no CUDA device), which the worker resolves before passing SFTConfig's use_cpu.
    own = set(TrainConfig.model_fields) - set(SFTArgs.model_fields)
    assert own & set(theirs) == {"use_cpu"}
    assert set(TrainConfig().sft_kwargs()) == set(SFTArgs.model_fields)


def test_the_train_section_builds_an_sftconfig_unchanged(tmp_path):
    from trl import SFTConfig

    train = TrainConfig(learning_rate=0.15, max_steps=60, warmup_steps=0.1, lr_scheduler_type="constant",
                        logging_steps=5, save_total_limit=None, nproc_per_node=2)  # fmt: skip
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, **train.sft_kwargs())
    for key, value in train.sft_kwargs().items():
        assert getattr(args, key) == value, key
    assert args.get_warmup_steps(60) == 6  # a fraction < 1 of the steps, as the key's description says
