"""`UoraConfig`: the PEFT config of UORA (a sibling of PEFT's `VeraConfig`).

Validation happens at construction so that a bad value fails before any model is touched, with a
message that names the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from ._registry import UORA_PEFT_TYPE
from .init import PROJECTION_INITS

REINIT_TARGETS = ("fixed", "resample")
BIAS_CHOICES = ("none", "all", "uora_only")


@dataclass
class UoraConfig(PeftConfig):
    """Configuration of a [`UoraModel`].

    UORA adapts a frozen linear layer as ``h = W0 x + b ⊙ (B[:out] (d ⊙ (A[:, :in] x)))`` with frozen
    projections A (r × in_max) and B (out_max × r) shared by every adapted layer of one adapter and
    trainable vectors d (r) and b (out) per layer. A and B start as Haar-random semi-orthogonal
    matrices and are moved by re-initialisation during training whenever a slot of some layer's d
    stays below ``reinit_threshold`` (see ``uora.reinit``); that is why the projections are always
    saved with the adapter. They stay float32 in memory and on disk whatever the model is cast to
    (see ``uora.projections``).

    Args:
        r: number of rank slots (rows of A / columns of B); must be > 0.
        target_modules: module names, a regex, or ``"all-linear"``.
        projection_prng_key: seed of the ``torch.Generator`` that draws A and B.
        d_initial: initial value of every entry of d (b starts at zero, so ΔW = 0 at init).
        init_weights: False gives VeRA's test initialisation instead: b = 1 and d ~ N(0, 1) drawn from
            torch's global generator, so ΔW ≠ 0 from the start.
        uora_dropout: dropout on the adapter input.
        fan_in_fan_out: True for layers storing (in, out) weights (GPT-2 ``Conv1D``; set automatically).
        bias: ``"none"``, ``"all"`` or ``"uora_only"`` (which biases are trained and saved).
        modules_to_save: extra modules to train and save (e.g. ``["classifier"]``).
        layers_to_transform / layers_pattern: restrict adaptation to some layer indices.
        save_projection: must stay True; A and B change during training, so regenerating them from
            the seed (VeRA's ``save_projection=False``) would silently load a different adapter.
        projection_init: ``"orthogonal"`` (UORA) or ``"kaiming"`` (VeRA-style ablation).
        reinit_threshold: τ — a slot of a layer is dead while ``|d[i]| < τ``; must be ≥ 0.
        reinit_alpha: α — interpolation factor toward the target; must lie in [0, 1).
        reinit_patience: K — an event fires when a slot's dead-counter reaches a positive multiple of K.
        reinit_target: ``"fixed"`` (one target pair from ``reinit_seed``) or ``"resample"`` (one fresh
            pair per check that has events, shared by all of that check's events).
        reinit_seed: seed of the re-initialisation targets.
    """

    r: int = field(default=256, metadata={"help": "Number of rank slots of the shared projections."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module names or regex to adapt, or 'all-linear'. Linear and Conv1D layers only."},
    )
    projection_prng_key: int = field(default=0, metadata={"help": "Seed of the projections A and B."})
    d_initial: float = field(default=0.1, metadata={"help": "Initial value of d."})
    uora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "True for (in, out) weights (Conv1D)."})
    bias: str = field(default="none", metadata={"help": "Bias type: 'none', 'all' or 'uora_only'."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules to train and save, e.g. a classifier head."}
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: d = d_initial, b = 0 (ΔW = 0). False: b = 1, d ~ N(0, 1) as VeRA (tests)."},
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Layer indices to adapt."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the nn.ModuleList holding the layers, e.g. 'layers' or 'h'."}
    )
    save_projection: bool = field(
        default=True, metadata={"help": "Always True: re-initialisation changes A and B during training."}
    )
    projection_init: Literal["orthogonal", "kaiming"] = field(
        default="orthogonal", metadata={"help": "'orthogonal' (Haar, UORA) or 'kaiming' (VeRA-style)."}
    )
    reinit_threshold: float = field(default=1e-5, metadata={"help": "τ: a slot is dead while |d[i]| < τ."})
    reinit_alpha: float = field(default=0.5, metadata={"help": "α in [0, 1): interpolation factor."})
    reinit_patience: int = field(
        default=1, metadata={"help": "K: event when a dead-counter hits a multiple of K."}
    )
    reinit_target: Literal["fixed", "resample"] = field(
        default="fixed",
        metadata={"help": "'fixed' target pair, or 'resample': one fresh pair per check that has events."},
    )
    reinit_seed: int = field(default=0, metadata={"help": "Seed of the re-initialisation targets."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = UORA_PEFT_TYPE
        self.target_modules = (
            set(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        )
        _validate(self)


def _validate(cfg: UoraConfig) -> None:
    """Reject values that would make the method meaningless; every message names its field."""
    if isinstance(cfg.r, bool) or not isinstance(cfg.r, int) or cfg.r <= 0:
        raise ValueError(f"UoraConfig.r must be a positive integer, got {cfg.r!r}")
    if not cfg.save_projection:
        raise ValueError(
            "UoraConfig.save_projection=False is not supported: UORA re-initialisation changes the "
            "projections A and B during training, so they must be saved with the adapter"
        )
    if cfg.projection_init not in PROJECTION_INITS:
        raise ValueError(
            f"UoraConfig.projection_init must be one of {PROJECTION_INITS}, got {cfg.projection_init!r}"
        )
    if cfg.reinit_target not in REINIT_TARGETS:
        raise ValueError(
            f"UoraConfig.reinit_target must be one of {REINIT_TARGETS}, got {cfg.reinit_target!r}"
        )
    if not 0.0 <= cfg.reinit_alpha < 1.0:
        raise ValueError(f"UoraConfig.reinit_alpha must lie in [0, 1), got {cfg.reinit_alpha!r}")
    if cfg.reinit_threshold < 0:
        raise ValueError(f"UoraConfig.reinit_threshold must be >= 0, got {cfg.reinit_threshold!r}")
    if (
        isinstance(cfg.reinit_patience, bool)
        or not isinstance(cfg.reinit_patience, int)
        or cfg.reinit_patience < 1
    ):
        raise ValueError(f"UoraConfig.reinit_patience must be an integer >= 1, got {cfg.reinit_patience!r}")
    if not 0.0 <= cfg.uora_dropout < 1.0:
        raise ValueError(f"UoraConfig.uora_dropout must lie in [0, 1), got {cfg.uora_dropout!r}")
    if cfg.bias not in BIAS_CHOICES:
        raise ValueError(f"UoraConfig.bias must be one of {BIAS_CHOICES}, got {cfg.bias!r}")
    if cfg.layers_pattern and cfg.layers_to_transform is None:
        raise ValueError("UoraConfig.layers_pattern requires UoraConfig.layers_to_transform to be set")
