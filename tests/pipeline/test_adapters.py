# ruff: noqa: E501  (expected messages are compared verbatim)
"""adapter section -> PEFT config: the field mapping and that the result really adapts a model."""

from __future__ import annotations

import pytest

from pipeline.adapters import build_peft_config, peft_kwargs
from pipeline.config import AdapterConfig


def _adapted_modules(model) -> set[str]:
    return {name.split(".")[-1] for name, module in model.named_modules()
            if hasattr(module, "base_layer")}  # fmt: skip


def test_lora_mapping_and_default_alpha(tiny_llama):
    from peft import LoraConfig, get_peft_model

    cfg = AdapterConfig(method="lora", r=4, dropout=0.1, target_modules=["q_proj", "v_proj"])
    peft_cfg = build_peft_config(cfg)
    assert isinstance(peft_cfg, LoraConfig)
    assert (peft_cfg.r, peft_cfg.lora_alpha, peft_cfg.lora_dropout) == (4, 8, 0.1)
    assert set(peft_cfg.target_modules) == {"q_proj", "v_proj"}
    assert str(peft_cfg.task_type) in ("CAUSAL_LM", "TaskType.CAUSAL_LM")
    assert build_peft_config(AdapterConfig(method="lora", r=4, lora_alpha=32)).lora_alpha == 32
    model = get_peft_model(tiny_llama(), peft_cfg)
    assert _adapted_modules(model) == {"q_proj", "v_proj"}


def test_vera_all_linear_excludes_lm_head(tiny_llama):
    from peft import VeraConfig, get_peft_model

    cfg = AdapterConfig(method="vera", r=8, projection_prng_key=7, d_initial=0.2, dropout=0.05)
    peft_cfg = build_peft_config(cfg)
    assert isinstance(peft_cfg, VeraConfig)
    assert (peft_cfg.r, peft_cfg.projection_prng_key, peft_cfg.d_initial, peft_cfg.vera_dropout) == (
        8,
        7,
        0.2,
        0.05,
    )
    assert peft_cfg.save_projection is True
    model = get_peft_model(tiny_llama(), peft_cfg)
    assert _adapted_modules(model) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert "lm_head" not in _adapted_modules(model)


def test_uora_kwargs_use_the_agreed_field_names():
    cfg = AdapterConfig(method="uora", r=16, dropout=0.1, projection_init="kaiming",
                        reinit={"threshold": 1e-4, "alpha": 0.3, "patience": 2, "target": "resample", "seed": 5})  # fmt: skip
    kwargs = peft_kwargs(cfg)
    assert kwargs == {
        "r": 16, "target_modules": "all-linear", "modules_to_save": None, "task_type": "CAUSAL_LM",
        "projection_prng_key": 0, "d_initial": 0.1, "save_projection": True, "uora_dropout": 0.1,
        "projection_init": "kaiming", "reinit_threshold": 1e-4, "reinit_alpha": 0.3, "reinit_patience": 2,
        "reinit_target": "resample", "reinit_seed": 5,
    }  # fmt: skip


def _uora_available() -> bool:
    try:
        import uora
    except ImportError:
        return False
    return hasattr(uora, "UoraConfig")


@pytest.mark.skipif(not _uora_available(),
                    reason="the uora package (branch 'uora') is not merged into this branch yet")  # fmt: skip
def test_uora_builds_a_uora_config(tiny_llama):
    from peft import get_peft_model

    import uora

    cfg = AdapterConfig(method="uora", r=4, reinit={"threshold": 1e-4, "patience": 2})
    peft_cfg = build_peft_config(cfg)
    assert isinstance(peft_cfg, uora.UoraConfig)
    assert (peft_cfg.r, peft_cfg.reinit_threshold, peft_cfg.reinit_patience) == (4, 1e-4, 2)
    assert peft_cfg.save_projection is True and peft_cfg.projection_init == "orthogonal"
    model = get_peft_model(tiny_llama(), peft_cfg)
    assert "lm_head" not in _adapted_modules(model) and "q_proj" in _adapted_modules(model)
