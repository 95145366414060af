"""Helpers shared by the uora tests."""

from __future__ import annotations

import torch

import uora


def randomise_vectors(peft_model, seed: int = 0, adapter: str = "default") -> None:
    """Give every d and b random non-trivial values so that ΔW ≠ 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, uora.UoraLayer) and adapter in module.uora_lambda_d:
                d, b = module.uora_lambda_d[adapter], module.uora_lambda_b[adapter]
                d.copy_(torch.randn(d.shape, generator=gen))
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)


def adapter_state(peft_model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
