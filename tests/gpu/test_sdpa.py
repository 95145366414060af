"""SDPA attention, as the pipeline loads models: the flash kernel serves unpadded training batches
(forward and backward) and matches eager attention; padded batches use the memory-efficient
kernel (the CPU rehearsal: math) and match eager at the real tokens."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from tests.conftest import build_tiny_llama

pytestmark = pytest.mark.gpu

RTOL = 2e-2  # bf16: |Δ| relative to the largest reference value


def pair(device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same bf16 Llama twice (head dim 64): SDPA and eager attention."""
    shape = dict(vocab_size=256, hidden_size=256, intermediate_size=512, max_position_embeddings=256,
                 use_cache=False)  # fmt: skip
    models = [
        build_tiny_llama(0, attn_implementation=attention, **shape).to(device=device, dtype=torch.bfloat16)
        for attention in ("sdpa", "eager")
    ]
    assert models[0].config._attn_implementation == "sdpa"
    assert models[1].config._attn_implementation == "eager"
    return models[0], models[1]


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def test_pipeline_loads_models_with_sdpa(device, gpu_model_dir):
    from pipeline.config import ModelConfig
    from pipeline.models import load_model

    model = load_model(ModelConfig(name_or_path=str(gpu_model_dir), dtype="bfloat16"))
    assert model.config._attn_implementation == "sdpa"


def test_flash_kernel_trains_and_matches_eager(device):
    sdpa, eager = pair(device)
    ids = torch.randint(256, (2, 128), generator=torch.Generator().manual_seed(0)).to(device)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if flash cannot serve these inputs
        out = sdpa(input_ids=ids, labels=ids)
        out.loss.backward()
    reference = eager(input_ids=ids, labels=ids)
    reference.loss.backward()
    assert relative(out.logits, reference.logits) <= RTOL
    assert abs(out.loss.item() - reference.loss.item()) <= RTOL * reference.loss.item()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        got, want = sdpa.get_parameter(name).grad, eager.get_parameter(name).grad
        error = float((got.float() - want.float()).norm() / want.float().norm())
        assert error <= 5 * RTOL, f"{name}: gradient differs by {error:.3g} (relative)"


def test_padded_batch_matches_eager_at_real_tokens(device):
    sdpa, eager = pair(device)
    ids = torch.randint(256, (2, 64), generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.ones_like(ids)
    mask[0, :9] = 0  # left padding on the first row
    backend = SDPBackend.EFFICIENT_ATTENTION if device.type == "cuda" else SDPBackend.MATH
    with torch.no_grad():
        with sdpa_kernel(backend):
            got = sdpa(input_ids=ids, attention_mask=mask).logits
        want = eager(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert relative(got[real], want[real]) <= RTOL
