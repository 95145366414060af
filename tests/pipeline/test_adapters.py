"""adapter section -> PEFT config: construction with the section's own field names, and the result
really adapts a model."""

from __future__ import annotations

import pytest

from pipeline.adapters import build_peft_config
from pipeline.schema import ADAPTERS, LoraAdapter, UoraAdapter, VeraAdapter


def _adapted_modules(model) -> set[str]:
    return {name.split(".")[-1] for name, module in model.named_modules()
            if hasattr(module, "base_layer")}  # fmt: skip


SECTIONS = [
    UoraAdapter(r=16, uora_dropout=0.1, projection_init="kaiming", projection_prng_key=3, d_initial=0.5,
                reinit_threshold=1e-4, reinit_alpha=0.3, reinit_patience=2, reinit_target="resample",
                reinit_seed=5, modules_to_save=["lm_head"]),
    LoraAdapter(r=4, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]),
    VeraAdapter(r=8, projection_prng_key=7, d_initial=0.2, vera_dropout=0.05, save_projection=False),
]  # fmt: skip


@pytest.mark.parametrize("section", SECTIONS, ids=lambda section: section.method)
def test_every_key_of_the_section_arrives_under_its_own_name(section):
    import uora  # noqa: F401  (registers UORA with PEFT)

    peft_cfg = build_peft_config(section)
    assert type(peft_cfg).__name__ == f"{section.method.capitalize()}Config"
    assert str(peft_cfg.task_type) in ("CAUSAL_LM", "TaskType.CAUSAL_LM")
    for key, value in section.model_dump(exclude={"method"}).items():
        expected = set(value) if key == "target_modules" and isinstance(value, list) else value
        assert getattr(peft_cfg, key) == expected, key
    assert set(ADAPTERS) == {"uora", "lora", "vera"}


def test_lora_alpha_defaults_to_twice_the_rank_also_after_an_override():
    assert LoraAdapter(r=4).lora_alpha == 8 and build_peft_config(LoraAdapter(r=4)).lora_alpha == 8
    assert LoraAdapter(r=32).lora_alpha == 64 and LoraAdapter(r=32, lora_alpha=16).lora_alpha == 16


def test_lora_on_a_model(tiny_llama):
    from peft import get_peft_model

    peft_cfg = build_peft_config(LoraAdapter(r=4, target_modules=["q_proj", "v_proj"]))
    model = get_peft_model(tiny_llama(), peft_cfg)
    assert _adapted_modules(model) == {"q_proj", "v_proj"}


@pytest.mark.parametrize("method", ["vera", "uora"])
def test_all_linear_excludes_lm_head(method, tiny_llama):
    from peft import get_peft_model

    peft_cfg = build_peft_config(ADAPTERS[method](r=8))
    assert peft_cfg.save_projection is True
    model = get_peft_model(tiny_llama(), peft_cfg)
    assert _adapted_modules(model) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                       "down_proj"}  # fmt: skip
