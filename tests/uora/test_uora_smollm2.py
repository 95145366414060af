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
            [
                {"role": "user", "content": row["instruction"]},
                {"role": "assistant", "content": row["output"]},
            ],
            tokenize=False,
        )
        for row in rows
    ]
    batches = []
    for start in range(0, len(texts), BATCH):
        enc = tokenizer(
            texts[start : start + BATCH],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=MAX_LEN,
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


@pytest.mark.slow
def test_sft_trainer_with_uora_config_and_callback(smollm2_dir, shared_data, tmp_path):
    """The README's SFTTrainer recipe: peft_config=UoraConfig + UoraReinitCallback.attach."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = json.loads((shared_data / "instruct" / "gpteacher_roleplay.json").read_text())[:8]
    dataset = Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": row["instruction"][:200]},
                    {"role": "assistant", "content": row["output"][:200]},
                ]
            }
            for row in rows
        ]
    )
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=5e-3,
        max_length=MAX_LEN,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        activation_checkpointing=True,  # TRL's default, under transformers' current (non-deprecated) name
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32),
        train_dataset=dataset,
        args=args,
        processing_class=AutoTokenizer.from_pretrained(smollm2_dir),
        peft_config=UoraConfig(r=16, target_modules=["q_proj", "v_proj"], reinit_threshold=0.2),
    )
    callback = uora.UoraReinitCallback.attach(trainer)
    assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all("uora/reinit_events" in entry for entry in logs)
    # d_initial 0.1 < τ 0.2: every slot of every layer is dead at the first check
    assert logs[0]["uora/reinit_events"] == 16 * 2 * trainer.model.config.num_hidden_layers
    assert isinstance(trainer.model.peft_config["default"], UoraConfig)
