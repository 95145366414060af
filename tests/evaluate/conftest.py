"""Fixtures for the evaluate tests: SmolLM2 loaded once per session, a small LoRA adapter."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """(model, tokenizer) of SmolLM2-135M-Instruct, shared read-only by the evaluate tests."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    return model, tokenizer


def make_lora_adapter(smollm2_dir: Path, out_dir: Path) -> Path:
    """Save a tiny LoRA adapter with random (non-zero) B so it really changes the outputs,
    plus the tokenizer, as the train stage leaves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    config = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def lora_adapter(smollm2_dir, tmp_path_factory):
    return make_lora_adapter(smollm2_dir, tmp_path_factory.mktemp("adapter"))
