"""bf16 UORA training against a float32 reference: same model, data, seeds and re-init events.

The bf16 run is what `model.dtype: bfloat16` + `train.bf16: true` does: a bf16 base, the adapter's
trainable vectors upcast to float32 by PEFT, the forward under bf16 autocast. Re-initialisation
fires on every step (threshold 3.0; |d| stays near 1 at this learning rate), so
both runs move the shared projections A/B identically: in float32 they must agree bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import build_tiny_llama

pytestmark = pytest.mark.gpu

STEPS = 20
# Tolerances, set from CPU bf16 (torch 2.13, 20 steps): loss 1e-4 worst step, d 0.07, b 0.09.
LOSS_RTOL = 5e-3  # per step, |loss_bf16 - loss_fp32| / loss_fp32
UPDATE_RTOL = 0.25  # ||Δ_bf16 - Δ_fp32|| / ||Δ_fp32|| for d and b (Δ = trained - initial)


def tiny_llama(device: torch.device) -> torch.nn.Module:
    shape = dict(vocab_size=256, hidden_size=128, intermediate_size=256, use_cache=False)
    return build_tiny_llama(0, **shape).to(device)


def batches(device: torch.device) -> list[torch.Tensor]:
    """Learnable sequences: each row counts up in steps of 7 from a random start (mod 256)."""
    generator = torch.Generator().manual_seed(1)
    starts = torch.randint(256, (STEPS, 8, 1), generator=generator)
    return [((s + 7 * torch.arange(64)) % 256).to(device) for s in starts]


def train(model: torch.nn.Module, bf16: bool, device: torch.device, folder) -> tuple[list[float], dict]:
    from peft import get_peft_model
    from safetensors.torch import load_file

    import uora

    config = uora.UoraConfig(
        r=16,
        target_modules="all-linear",
        d_initial=0.1,
        reinit_threshold=3.0,
        reinit_alpha=0.5,
        reinit_patience=1,
    )
    model = get_peft_model(model, config)
    initial = {n: p.detach().clone().float() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses, events = [], 0
    for ids in batches(device):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        events += uora.reinit_step(model)
        losses.append(loss.item())
    model.save_pretrained(folder)
    state = {
        "initial": initial,
        "trained": {n: p.detach().float() for n, p in model.named_parameters() if p.requires_grad},
        "trainable_dtypes": {p.dtype for p in model.parameters() if p.requires_grad},
        "buffers": {n: b.detach() for n, b in model.named_buffers() if "uora_A" in n or "uora_B" in n},
        "saved": load_file(folder / "adapter_model.safetensors"),
        "events": events,
    }
    return losses, state


@pytest.fixture(scope="module")
def runs(device, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bf16")
    reference = train(tiny_llama(device), False, device, folder / "fp32")
    bf16 = train(tiny_llama(device).to(torch.bfloat16), True, device, folder / "bf16")
    return reference, bf16


def test_loss_trajectory_matches_float32(runs):
    (ref_losses, _), (bf16_losses, _) = runs
    assert ref_losses[-1] < ref_losses[0] - 0.05, "the reference did not learn: the comparison is empty"
    worst = max(abs(a - b) / a for a, b in zip(ref_losses, bf16_losses, strict=True))
    assert worst <= LOSS_RTOL, f"bf16 loss departs from float32 by {worst:.3g} (relative) > {LOSS_RTOL}"


def test_trained_vectors_match_float32(runs):
    (_, ref), (_, bf16) = runs
    assert bf16["trainable_dtypes"] == {torch.float32}, "PEFT keeps trainable adapter weights in float32"
    assert ref["trained"].keys() == bf16["trained"].keys() and ref["trained"]
    for kind in ("uora_lambda_d", "uora_lambda_b"):
        names = [n for n in ref["trained"] if kind in n]
        assert names, kind
        ref_delta = torch.cat([(ref["trained"][n] - ref["initial"][n]).flatten() for n in names])
        bf16_delta = torch.cat([(bf16["trained"][n] - bf16["initial"][n]).flatten() for n in names])
        error = float((bf16_delta - ref_delta).norm() / ref_delta.norm())
        assert error <= UPDATE_RTOL, f"{kind}: bf16 update departs by {error:.3g} (relative) > {UPDATE_RTOL}"


def test_projections_stay_float32_and_exact(runs):
    """A/B are shared state that re-initialisation edits in place: rounding them to bf16 would
    compound every event (issue 13). They must stay float32, in memory and on disk, and equal the
    float32 run's bit for bit (same events, same float32 arithmetic)."""
    (_, ref), (_, bf16) = runs
    assert ref["events"] == bf16["events"] > 0
    assert bf16["buffers"] and bf16["buffers"].keys() == ref["buffers"].keys()
    for name, tensor in bf16["buffers"].items():
        assert tensor.dtype == torch.float32, f"{name} is {tensor.dtype} in memory after bf16 training"
        assert torch.equal(tensor, ref["buffers"][name]), f"{name} differs from the float32 run"
    saved = {k: v for k, v in bf16["saved"].items() if "uora_A" in k or "uora_B" in k}
    assert saved
    for key, tensor in saved.items():
        assert tensor.dtype == torch.float32, f"{key} saved as {tensor.dtype}"
        assert torch.equal(tensor, ref["saved"][key]), f"saved {key} differs from the float32 run"
