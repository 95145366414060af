"""Adapters: the ``adapter:`` section -> its PEFT config (no renaming: the section's field names are the
PEFT config's own; tests/pipeline/test_schema_pins.py pins them), and the logit check that a merged adapter
computes what the unmerged one did (export and evaluate use a merged model only if it passes)."""

from __future__ import annotations

import json
import pkgutil
from importlib import resources
from typing import Any

# Relative tolerance on max |merged - reference| / max |reference| per saved dtype. Merging and checking run
# in float32 (half-precision bases upcast exactly): what is left is each merged weight's one rounding to the
# saved dtype. Measured on SmolLM2-135M, random LoRA/UORA/VeRA updates: float32 ~3e-6, bf16 ~7e-3, fp16 ~1e-3.
DEFAULT_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}

# Fixed verification prompts: varied enough to touch many tokens, short enough to run on CPU.
_PROMPTS = (resources.files("pipeline") / "builtin" / "verify_prompts.jsonl").read_text().splitlines()
VERIFY_PROMPTS: tuple[str, ...] = tuple(json.loads(line)["prompt"] for line in _PROMPTS)

PEFT_CONFIGS = {"uora": "uora.UoraConfig", "lora": "peft.LoraConfig", "vera": "peft.VeraConfig"}


def peft_config_class(method: str) -> type:
    """``UoraConfig`` / ``LoraConfig`` / ``VeraConfig``, imported only now (never while validating);
    importing ``uora`` also registers the method with PEFT."""
    return pkgutil.resolve_name(PEFT_CONFIGS[method])


def build_peft_config(adapter: Any, task_type: str | None = "CAUSAL_LM") -> Any:
    """The PEFT config of an ``adapter:`` section (``pipeline.schema.AdapterConfig``)."""
    return peft_config_class(adapter.method)(**adapter.model_dump(exclude={"method"}), task_type=task_type)


def verification_inputs(tokenizer: Any, count: int, max_tokens: int) -> list[Any]:
    """Token-id tensors for the first ``count`` fixed prompts, rendered with the chat template."""
    import torch

    texts = VERIFY_PROMPTS[:count]
    if tokenizer.chat_template:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                               add_generation_prompt=True) for text in texts]  # fmt: skip
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens] for text in texts]
    return [torch.tensor([row], dtype=torch.long) for row in ids]


def logits_of(model: Any, inputs: list[Any]) -> list[Any]:
    """Float32 logits for each prompt (one forward each: no padding, so nothing to mask)."""
    import torch

    with torch.no_grad():
        return [model(input_ids=ids.to(model.device)).logits[0].float().cpu() for ids in inputs]


def compare_logits(reference: list[Any], candidate: list[Any]) -> dict[str, float]:
    """Max and mean absolute logit error, the error relative to the reference's largest logit,
    and how often the arg-max token agrees (over every position of every prompt)."""
    import torch

    ref, cand = torch.cat(reference), torch.cat(candidate)
    diff = (ref - cand).abs()
    return {
        "max_abs_error": (max_abs := float(diff.max())),
        "mean_abs_error": float(diff.mean()),
        "rel_error": max_abs / max(float(ref.abs().max()), 1e-12),
        "top1_agreement": float((ref.argmax(-1) == cand.argmax(-1)).float().mean()),
        "positions": int(ref.shape[0]),
    }
