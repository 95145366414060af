"""Fixtures for the pipeline-spine tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or ``$UORA_SHARED_DATA`` (for checkouts that do not sit next to it, such as
    git worktrees)."""
    for candidate in (SHARED_DATA, Path(os.environ.get("UORA_SHARED_DATA", "/nonexistent"))):
        if candidate.is_dir():
            return candidate
    pytest.skip(f"shared data not found at {SHARED_DATA} (or set UORA_SHARED_DATA)")
