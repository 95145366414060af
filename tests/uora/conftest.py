"""Fixtures for the uora tests (helpers live in uora_helpers.py)."""

from __future__ import annotations

import pytest
import torch

import uora  # noqa: F401  (registers UORA with PEFT)


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
