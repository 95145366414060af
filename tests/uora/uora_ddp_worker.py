"""Worker for test_uora_ddp.py, launched by torchrun: DDP (gloo, CPU) training with re-initialisation.

Each rank trains on its own shard, then writes its adapter state to <out_dir>/rank<N>.pt.
"""

from __future__ import annotations

import os
import sys

import torch
from peft import get_peft_model, get_peft_model_state_dict
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from uora import UoraConfig, UoraReinitCallback, total_reinit_events


class RandomTokens(Dataset):
    def __init__(self, n: int = 16, length: int = 10):
        self.rows = torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def main(out_dir: str) -> None:
    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    cfg = UoraConfig(r=8, target_modules="all-linear", reinit_threshold=0.05, reinit_target="resample")
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        model.base_model.uora_layers("default")[2].uora_lambda_d["default"][1] = 0.0
        model.base_model.uora_layers("default")[11].uora_lambda_d["default"][5] = 0.0
    rank = int(os.environ.get("RANK", "0"))
    if rank == 1:  # as if rank 1's LAPACK rounded differently: the callback's broadcast must undo it
        with torch.no_grad():
            model.base_model.uora_A["default"].mul_(1.0 + 1e-6)
    args = TrainingArguments(
        output_dir=out_dir,
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo",
        # DDP would otherwise broadcast rank 0's buffers (A, B, counters) at every forward, hiding
        # whether each rank computes the same re-initialisation on its own
        ddp_broadcast_buffers=False,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(), callbacks=[UoraReinitCallback()])
    trainer.train()
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    state["world_size"] = torch.tensor(trainer.args.world_size)
    state["events"] = torch.tensor(total_reinit_events(model))
    torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
