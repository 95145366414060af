"""Known-harmless third-party console output, silenced where it arises, each message named with why a user
can do nothing about it. ``install()`` runs first in ``python -m pipeline`` and in each training worker,
before the libraries are imported (tqdm and datasets read their settings from the environment at import)."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path

# [logger, message start, why it is dropped], one per line
LOG_MESSAGES = [json.loads(line) for line in (Path(__file__).parent / "builtin" / "quiet_log_messages.jsonl")
                .read_text(encoding="utf-8").splitlines()]  # fmt: skip
# One filter object per message: logging adds an object once, so a second install() adds nothing.
_FILTERS = [(name, lambda record, start=start: not record.getMessage().startswith(start))
            for name, start, _why in LOG_MESSAGES]


def install() -> None:
    """Add the filters (idempotent). Output that is not a terminal (a log file, a Slurm job) also gets
    progress bars redrawn every 5 s, at one position (a nested bar moves the cursor up with ``ESC[A``:
    debris in a file), and none for datasets' preprocessing passes (seconds each)."""
    for name, keep in _FILTERS:
        logging.getLogger(name).addFilter(keep)
    # PEFT 0.21 reads transformers' old attribute name when wrapping a model (ours: activation_checkpointing)
    warnings.filterwarnings("ignore", r"`is_gradient_checkpointing` is deprecated", FutureWarning)
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_MININTERVAL", "5")
        os.environ.setdefault("TQDM_POSITION", "0")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
