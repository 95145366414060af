"""SmolLM2-135M-Instruct: 20 UORA optimizer steps on real instruction data lower the training loss."""

from __future__ import annotations

import json

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import uora
from uora import UoraConfig

N_EXAMPLES, MAX_LEN, BATCH, STEPS, EVAL_BATCHES = 24, 64, 2, 20, 6


def _batches(shared_data, tokenizer) -> list[dict[str, torch.Tensor]]:
    rows = json.loads((shared_data / "instruct" / "gsm8k_train_alpaca.json").read_text())[:N_EXAMPLES]
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": row["output"]}],
            tokenize=False,
        )
        for row in rows
    ]
    batches = []
    for start in range(0, len(texts), BATCH):
        enc = tokenizer(
            texts[start : start + BATCH], return_tensors="pt", padding=True, truncation=True, max_length=MAX_LEN
        )
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        batches.append({**enc, "labels": labels})
    return batches


def _mean_loss(model, batches) -> float:
    model.eval()
    with torch.no_grad():
        return sum(model(**b).loss.item() for b in batches[:EVAL_BATCHES]) / EVAL_BATCHES


@pytest.mark.slow
def test_twenty_steps_lower_the_training_loss(smollm2_dir, shared_data):
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    model = get_peft_model(base, UoraConfig(r=64, target_modules="all-linear"))
    batches = _batches(shared_data, tokenizer)
    before = _mean_loss(model, batches)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    events = 0
    for step in range(STEPS):
        model.train()
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        events += uora.reinit_step(model)
    after = _mean_loss(model, batches)
    assert after < before - 0.05, (before, after)
    assert events == uora.total_reinit_events(model)
