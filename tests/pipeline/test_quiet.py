"""pipeline.quiet: the named third-party messages are dropped at their source, nothing else is."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from pipeline import quiet

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def restored_environment(monkeypatch):
    """install() sets tqdm's and datasets' variables when stderr is not a terminal (as under pytest)."""
    for name in ("TQDM_MININTERVAL", "TQDM_POSITION", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_named_log_messages_are_dropped_and_their_neighbours_kept(caplog):
    quiet.install()
    quiet.install()  # idempotent: one filter per message
    assert len(logging.getLogger("DeepSpeed").filters) == 1
    with caplog.at_level(logging.INFO):
        for name, start, _why in quiet.LOG_MESSAGES:
            logging.getLogger(name).warning(f"{start}: details")
            logging.getLogger(name).warning(f"something else: {start}")
    assert [record.getMessage() for record in caplog.records] == [
        f"something else: {start}" for _, start, _ in quiet.LOG_MESSAGES
    ]


def test_named_warnings_are_dropped_and_others_kept():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.install()
        for flag in ("is_gradient_checkpointing", "other_flag"):
            warnings.warn(f"`{flag}` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["`other_flag` is deprecated and will be removed in v6."]


def test_progress_bars_suit_a_log_file(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    quiet.install()
    assert "TQDM_POSITION" not in os.environ  # a terminal keeps tqdm's defaults
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    quiet.install()
    assert (os.environ["TQDM_MININTERVAL"], os.environ["TQDM_POSITION"]) == ("5", "0")
    assert os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1"


SOURCES = """
import sys
if sys.argv[1] == "quiet":
    from pipeline import quiet
    quiet.install()
import bitsandbytes  # noqa: F401  (its CPU backend looks for the optional kernel at import)
from deepspeed.accelerator import get_accelerator
get_accelerator()
"""


@pytest.mark.slow
def test_the_real_sources_are_silenced():
    """The messages come from where quiet.py says: importing bitsandbytes (on CPUs with AVX-512
    BF16) and DeepSpeed's accelerator detection (on hosts without a GPU) print them, unless
    ``install()`` ran first."""
    import torch

    def stderr(mode: str) -> str:
        run = subprocess.run([sys.executable, "-c", SOURCES, mode], cwd=REPO, capture_output=True, text=True,
                             timeout=600, check=True)  # fmt: skip
        return run.stdout + run.stderr

    loud, silent = stderr("loud"), stderr("quiet")
    if not torch.cuda.is_available():
        assert "Setting accelerator to CPU" in loud
    for _, start, _ in quiet.LOG_MESSAGES:
        assert start not in silent
