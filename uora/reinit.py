"""The re-initialisation rule (vector-magnitude check + interpolation toward a target) and its state.

At each check, for every adapted layer ℓ and rank slot i of an adapter:

1. if |d_ℓ[i]| < τ, the counter c_ℓ[i] is incremented (counters are never reset);
2. a *layer event* fires for (ℓ, i) when c_ℓ[i] was incremented by this check and is now a positive
   multiple of K;
3. slot i of the shared projections moves toward the target pair (R_A, R_B):
       A[i, :] ← α·A[i, :] + (1 − α)·R_A[i, :]      B[:, i] ← α·B[:, i] + (1 − α)·R_B[:, i]

**Several layers on one slot.** The authors' code applies one interpolation per layer event. With
n_i layer events on slot i in one check, this implementation applies exactly that — n_i successive
interpolations toward the same target — in closed form:

    A[i, :] ← α^{n_i}·A[i, :] + (1 − α^{n_i})·R_A[i, :]

which is independent of the order of the layers, hence deterministic. In `resample` mode one fresh
target pair is drawn per check that has at least one event (draw k of a stream rooted at
`reinit_seed`) and all of that check's events use it. Slots without events are left bit-identical;
d, b and the optimizer state are never touched.

**State.** Counters (`uora_reinit_counts[adapter]`, int32, layers × r) and the number of resample
draws (`uora_reinit_draws[adapter]`) are persistent buffers of the tuner, saved in the adapter state
dict next to A and B; the fixed target is a pure function of `reinit_seed` and is regenerated (and
cached) on demand. A resumed Trainer run therefore continues bit-identically with nothing but PEFT's
own checkpoint loading. A, B and the targets are float32 whatever dtype the model trains in (see
`uora.projections`), so every interpolation is computed and stored in float32.

**Cost.** Per adapter and check: one `torch.stack` of the d vectors, a few element-wise ops on a
(layers × r) tensor on the device, and a single host synchronisation (the event count) — no per-slot
or per-layer `.item()`. A and B are only written when something fired.

**Distributed.** d is identical on every rank after the gradient all-reduce, so every rank computes
the same counters and writes the same A/B: after the one broadcast at train start
(`sync_projections_from_rank0`) the ranks stay identical without any further communication, which
is why DDP's per-step buffer broadcast is switched off (`ddp_broadcast_buffers=False`). Under
DeepSpeed ZeRO-3 the d parameters are partitioned; they are gathered (read-only) with
`deepspeed.zero.GatheredParameters` first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .model import UoraModel


def find_uora_model(model: nn.Module) -> UoraModel:
    """The `UoraModel` tuner inside `model` (a PeftModel, a DDP/DeepSpeed wrapper of one, or the tuner)."""
    seen = model
    while hasattr(seen, "module") and isinstance(seen.module, nn.Module) and not isinstance(seen, UoraModel):
        seen = seen.module  # DistributedDataParallel / DeepSpeedEngine
    if isinstance(seen, UoraModel):
        return seen
    base = getattr(seen, "base_model", None)
    if isinstance(base, UoraModel):
        return base
    for module in seen.modules():
        if isinstance(module, UoraModel):
            return module
    raise ValueError("No UORA adapter found in the model (expected a PeftModel built with a UoraConfig)")


def _is_zero3_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id") and hasattr(param, "ds_status")


def _gathered(params: Sequence[torch.Tensor]) -> contextlib.AbstractContextManager:
    """Gather ZeRO-3-partitioned parameters for reading; a no-op otherwise (deepspeed imported lazily)."""
    if not any(_is_zero3_partitioned(p) for p in params):
        return contextlib.nullcontext()
    try:
        import deepspeed
    except ImportError as exc:  # pragma: no cover - only reachable with ZeRO-3 parameters
        raise RuntimeError(
            "UORA re-initialisation found ZeRO-3 parameters but deepspeed is not importable"
        ) from exc
    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)


def _trainable_adapters(tuner: UoraModel) -> Iterator[str]:
    for name in tuner.active_adapters:
        config = tuner.peft_config.get(name)
        if config is None or getattr(config, "inference_mode", False):
            continue
        if name in tuner._modules.get("uora_reinit_counts", {}):
            yield name


@torch.no_grad()
def reinit_adapter(tuner: UoraModel, adapter_name: str) -> int:
    """Apply one re-initialisation check to one adapter; returns the number of layer events."""
    config = tuner.peft_config[adapter_name]
    layers = tuner.uora_layers(adapter_name)
    if not layers:
        return 0
    if any(layer.merged for layer in layers):
        raise RuntimeError(
            "UORA re-initialisation on a merged adapter would corrupt unmerge(); unmerge first"
        )
    proj_a, proj_b = tuner.uora_A[adapter_name], tuner.uora_B[adapter_name]
    device = proj_a.device
    d_params = [layer.uora_lambda_d[adapter_name] for layer in layers]
    with _gathered(d_params):
        d = torch.stack([p.detach().to(device=device, dtype=torch.float32) for p in d_params])  # (L, r)

    counts = tuner.uora_reinit_counts[adapter_name]
    if counts.device != device:
        counts = counts.to(device)
        tuner.uora_reinit_counts[adapter_name] = counts
    if counts.shape != d.shape:
        raise RuntimeError(
            f"uora_reinit_counts[{adapter_name!r}] has shape {tuple(counts.shape)} but the adapter has "
            f"{d.shape[0]} layers × r={d.shape[1]}"
        )
    dead = d.abs() < config.reinit_threshold
    counts.add_(dead.to(counts.dtype))
    fired = dead & (counts % config.reinit_patience == 0)
    per_slot = fired.sum(dim=0)  # n_i: layer events on slot i
    events = int(per_slot.sum().item())  # the one host sync of the check
    if events == 0:
        return 0

    draws = tuner.uora_reinit_draws[adapter_name]
    draw_index = int(draws.item()) if config.reinit_target == "resample" else 0
    target_a, target_b = tuner.reinit_targets(adapter_name, draw_index)
    if config.reinit_target == "resample":
        draws.add_(1)

    # A, B (float32 masters, see uora.projections) and the targets are float32: so is every step here
    moved = per_slot > 0
    keep = torch.pow(float(config.reinit_alpha), per_slot.float())  # α^{n_i}; α^0 = 1 (also for α = 0)
    new_a = keep[:, None] * proj_a + (1.0 - keep)[:, None] * target_a
    new_b = keep[None, :] * proj_b + (1.0 - keep)[None, :] * target_b
    proj_a.copy_(torch.where(moved[:, None], new_a, proj_a))
    proj_b.copy_(torch.where(moved[None, :], new_b, proj_b))
    return events


def reinit_step(model: nn.Module) -> int:
    """Run one re-initialisation check on every trainable UORA adapter of `model`.

    Call it after each optimizer step in a custom training loop (the Trainer callback does this for
    you). Returns the number of layer events of this check (0 when nothing fired).
    """
    tuner = find_uora_model(model)
    return sum(reinit_adapter(tuner, name) for name in _trainable_adapters(tuner))


def sync_projections_from_rank0(model: nn.Module) -> bool:
    """Broadcast every UORA adapter's A and B from rank 0 (no-op outside torch.distributed).

    Every rank draws the same projections from the same seed, but the QR runs in the CPU's LAPACK,
    whose last-bit rounding can differ between CPU types; a one-time broadcast before training makes
    the ranks bit-identical on heterogeneous nodes too. Collective: call it on every rank (the
    Trainer callback does so in `on_train_begin`). Returns True when a broadcast happened.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    tuner = find_uora_model(model)
    for attr in ("uora_A", "uora_B"):
        container = getattr(tuner, attr)
        for name in sorted(container.keys()):
            dist.broadcast(container[name], src=0)
        container.drop_copies()  # a collective's in-place write need not move the version counter
    return True


def total_reinit_events(model: nn.Module) -> int:
    """Layer events since training began, derived from the saved counters (Σ ⌊c/K⌋): exact after a resume."""
    tuner = find_uora_model(model)
    total = 0
    for name in _trainable_adapters(tuner):
        counts = tuner.uora_reinit_counts[name]
        total += int((counts // tuner.peft_config[name].reinit_patience).sum().item())
    return total
