"""The adapter section -> its PEFT config: construction, no renaming (the section's field names are
the PEFT config's own; tests/pipeline/test_schema_pins.py pins them)."""

from __future__ import annotations

import importlib
from typing import Any

PEFT_CONFIGS = {
    "uora": ("uora", "UoraConfig"),
    "lora": ("peft", "LoraConfig"),
    "vera": ("peft", "VeraConfig"),
}


def peft_config_class(method: str) -> type:
    """``UoraConfig`` / ``LoraConfig`` / ``VeraConfig``, imported only now (never while validating);
    importing ``uora`` also registers the method with PEFT."""
    module, name = PEFT_CONFIGS[method]
    return getattr(importlib.import_module(module), name)


def build_peft_config(adapter: Any, task_type: str | None = "CAUSAL_LM") -> Any:
    """The PEFT config of an ``adapter:`` section (``pipeline.schema.AdapterConfig``)."""
    return peft_config_class(adapter.method)(**adapter.model_dump(exclude={"method"}), task_type=task_type)
