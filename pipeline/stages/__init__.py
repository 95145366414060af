"""Pipeline stages, in the order the driver runs them (see ``base.py`` for the contract)."""

import importlib
from types import ModuleType

STAGE_ORDER: tuple[str, ...] = ("prepare", "train", "evaluate", "export", "promote")


def load_stage(name: str) -> ModuleType:
    """Import a stage module lazily, so that CLI start-up and validation stay light."""
    if name not in STAGE_ORDER:
        raise ValueError(f"unknown stage {name!r}; stages are: {', '.join(STAGE_ORDER)}")
    return importlib.import_module(f"pipeline.stages.{name}")
