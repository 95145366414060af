"""The 'prepare' stage (not built yet)."""

from __future__ import annotations

from pipeline.stages.base import StageContext, StageNotImplemented, StageResult

NAME = "prepare"
INPUTS: tuple[str, ...] = ()
CONFIG_SECTIONS: tuple[str, ...] = ()


def run(ctx: StageContext) -> StageResult:
    raise StageNotImplemented(f"stage '{NAME}' is not implemented yet")
