"""The adapter section -> a PEFT config object, one function for all three methods.

Why one place: train, evaluate and export all need the same mapping from our config names to each
method's PEFT field names (``dropout`` is ``lora_dropout``/``vera_dropout``/``uora_dropout``), and
a drift between them would silently train one adapter and export another.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import AdapterConfig


def _targets(adapter_cfg: AdapterConfig) -> list[str] | str:
    # PEFT's "all-linear" adapts every linear layer except the output head (lm_head).
    targets = adapter_cfg.target_modules
    return targets if isinstance(targets, str) else list(targets)


def peft_kwargs(adapter_cfg: AdapterConfig, task_type: str | None = "CAUSAL_LM") -> dict[str, Any]:
    """The keyword arguments of the method's PEFT config class (useful for logging and tests)."""
    common: dict[str, Any] = {
        "r": adapter_cfg.r,
        "target_modules": _targets(adapter_cfg),
        "modules_to_save": list(adapter_cfg.modules_to_save) if adapter_cfg.modules_to_save else None,
        "task_type": task_type,
    }
    method = adapter_cfg.method
    if method == "lora":
        alpha = adapter_cfg.lora_alpha if adapter_cfg.lora_alpha is not None else 2 * adapter_cfg.r
        return {**common, "lora_alpha": alpha, "lora_dropout": adapter_cfg.dropout}
    shared = {
        "projection_prng_key": adapter_cfg.projection_prng_key,
        "d_initial": adapter_cfg.d_initial,
        "save_projection": adapter_cfg.save_projection,
    }
    if method == "vera":
        return {**common, **shared, "vera_dropout": adapter_cfg.dropout}
    if method == "uora":
        reinit = adapter_cfg.reinit
        return {
            **common,
            **shared,
            "uora_dropout": adapter_cfg.dropout,
            "projection_init": adapter_cfg.projection_init,
            "reinit_threshold": reinit.threshold,
            "reinit_alpha": reinit.alpha,
            "reinit_patience": reinit.patience,
            "reinit_target": reinit.target,
            "reinit_seed": reinit.seed,
        }
    raise ValueError(f"adapter.method: unknown method {method!r}")


def build_peft_config(adapter_cfg: AdapterConfig, task_type: str | None = "CAUSAL_LM") -> Any:
    """The ``UoraConfig`` / ``LoraConfig`` / ``VeraConfig`` for this adapter section.

    Imports are lazy: ``uora`` (which registers the method with PEFT) and ``peft`` load only when
    an adapter is actually built, never during config validation.
    """
    kwargs = peft_kwargs(adapter_cfg, task_type)
    if adapter_cfg.method == "lora":
        from peft import LoraConfig

        return LoraConfig(**kwargs)
    if adapter_cfg.method == "vera":
        from peft import VeraConfig

        return VeraConfig(**kwargs)
    from uora import UoraConfig

    return UoraConfig(**kwargs)
