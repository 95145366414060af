"""One definition of each adapter bound: the pipeline's validation of `adapter:` accepts exactly what
PEFT's config classes (UoraConfig, LoraConfig, VeraConfig) accept, pinned value by value.

"PEFT accepts" means: the method's config class is built from the section's keys, unvalidated and
under the same names (``pipeline.adapters`` does exactly this construction), *and* wraps a tiny
model, because LoRA and VeRA check some values only when a layer is created. A value the pipeline
passes and PEFT refuses would fail in the worker after the model has loaded (``reinit_alpha: 1.0``
did). Where the pipeline is deliberately stricter than PEFT, the row says why.

To extend: add rows to BOUNDS; a field with a bound (pydantic constraint or Literal) and no row fails
``test_every_bounded_field_has_rows``.
"""

from __future__ import annotations

from typing import Any, Literal, get_args, get_origin

import pytest
from pydantic import ValidationError

from pipeline.adapters import peft_config_class
from pipeline.schema import ADAPTERS, PipelineConfig

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # torch.Generator.manual_seed's range
DROPOUT_1 = "dropout 1 zeroes the adapter's input: it never gets a gradient"
NEGATIVE_DROPOUT = "PEFT silently treats a negative dropout as none"

# (method, field path in `adapter:`, value, PEFT accepts it, why the pipeline refuses it anyway)
BOUNDS: list[tuple[str, str, Any, bool, str | None]] = [
    ("uora", "r", 0, False, None),
    ("uora", "r", 1, True, None),
    ("uora", "uora_dropout", -0.01, False, None),
    ("uora", "uora_dropout", 0.0, True, None),
    ("uora", "uora_dropout", 0.99, True, None),
    ("uora", "uora_dropout", 1.0, False, None),
    ("uora", "reinit_alpha", -0.01, False, None),
    ("uora", "reinit_alpha", 0.0, True, None),
    ("uora", "reinit_alpha", 0.999, True, None),
    ("uora", "reinit_alpha", 1.0, False, None),
    ("uora", "reinit_threshold", -1e-9, False, None),
    ("uora", "reinit_threshold", 0.0, True, None),
    ("uora", "reinit_patience", 0, False, None),
    ("uora", "reinit_patience", 1, True, None),
    ("uora", "reinit_target", "fixed", True, None),
    ("uora", "reinit_target", "resample", True, None),
    ("uora", "reinit_target", "random", False, None),
    ("uora", "reinit_seed", -1, True, None),
    ("uora", "projection_init", "orthogonal", True, None),
    ("uora", "projection_init", "kaiming", True, None),
    ("uora", "projection_init", "xavier", False, None),
    ("uora", "save_projection", False, False, None),
    ("uora", "projection_prng_key", SEED_MIN, True, None),
    ("uora", "projection_prng_key", SEED_MIN - 1, False, None),
    ("uora", "projection_prng_key", SEED_MAX, True, None),
    ("uora", "projection_prng_key", SEED_MAX + 1, False, None),
    ("uora", "d_initial", -1.0, True, None),
    ("lora", "r", 0, False, None),
    ("lora", "r", 1, True, None),
    ("lora", "lora_dropout", -0.01, True, NEGATIVE_DROPOUT),
    ("lora", "lora_dropout", 0.0, True, None),
    ("lora", "lora_dropout", 0.99, True, None),
    ("lora", "lora_dropout", 1.0, True, DROPOUT_1),
    ("lora", "lora_alpha", 0, True, "scaling lora_alpha / r = 0: the adapter has no effect"),
    ("lora", "lora_alpha", 1, True, None),
    ("vera", "r", 0, False, None),
    ("vera", "r", 1, True, None),
    ("vera", "vera_dropout", -0.01, True, NEGATIVE_DROPOUT),
    ("vera", "vera_dropout", 0.0, True, None),
    ("vera", "vera_dropout", 1.0, True, DROPOUT_1),
    ("vera", "save_projection", False, True, None),  # VeRA regenerates its projections from the seed
    ("vera", "projection_prng_key", SEED_MAX, True, None),
    ("vera", "projection_prng_key", SEED_MAX + 1, False, None),
]


def _section(method: str, key: str, value: Any) -> dict[str, Any]:
    return {"method": method, "r": 4, "target_modules": ["q_proj", "v_proj"], key: value}


def _pipeline_accepts(section: dict[str, Any]) -> bool:
    raw = {"run": {"name": "bounds"}, "model": {"name_or_path": "org/model"}, "adapter": section}
    try:
        PipelineConfig.model_validate(raw)
    except ValidationError:
        return False
    return True


def _peft_accepts(section: dict[str, Any], tiny_llama) -> bool:
    from peft import get_peft_model

    import uora  # noqa: F401  (registers UORA with PEFT)

    fields = {key: value for key, value in section.items() if key != "method"}
    try:  # unvalidated on purpose: what PEFT makes of the value itself
        get_peft_model(tiny_llama(), peft_config_class(section["method"])(**fields, task_type="CAUSAL_LM"))
    except (ValueError, TypeError, RuntimeError, ArithmeticError):
        return False
    return True


@pytest.mark.parametrize(("method", "path", "value", "peft_accepts", "stricter"), BOUNDS)
def test_pipeline_and_peft_agree_on_every_boundary(method, path, value, peft_accepts, stricter, tiny_llama):
    section = _section(method, path, value)
    assert _peft_accepts(section, tiny_llama) is peft_accepts  # PEFT's own bound, pinned
    assert _pipeline_accepts(section) is (peft_accepts and stricter is None)


def _bounded(model: type) -> set[str]:
    return {name for name, field in model.model_fields.items()
            if field.metadata or get_origin(field.annotation) is Literal} - {"method"}  # fmt: skip


@pytest.mark.parametrize("method", sorted(ADAPTERS))
def test_every_bounded_field_has_rows(method):
    covered = {key for row_method, key, *_ in BOUNDS if row_method == method}
    # method selects the PEFT class; target_modules depends on the model, not on a bound
    assert _bounded(ADAPTERS[method]) <= covered
    for key in ("reinit_target", "projection_init") if method == "uora" else ():
        literal = get_args(ADAPTERS[method].model_fields[key].annotation)
        assert {value for m, k, value, *_ in BOUNDS if (m, k) == (method, key)} >= set(literal)
    rows = {key for _, key, *_ in BOUNDS}
    assert {"projection_prng_key", "save_projection", "d_initial", "reinit_seed"} <= rows
