"""Known-harmless third-party console output, silenced where it arises: each message is named (its
logger or warning text) with the reason a user can do nothing about it. Everything else still shows.

``install()`` runs first in ``python -m pipeline`` and in each training worker, before the libraries
are imported (tqdm and datasets read their settings from the environment at import).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# (logger, message start, why it is dropped)
LOG_MESSAGES = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward",
     "bitsandbytes looks for an optional 4-bit CPU kernel (the `kernels` package) at import; the "
     "pipeline never runs 4-bit layers, and 8-bit ones do not use it"),
    ("DeepSpeed", "Setting accelerator to CPU",
     "DeepSpeed (installed by make setup, imported by the training libraries even when a run does not "
     "use it) says, on a host without a GPU, that it picked the CPU"),
    ("datasets.packaged_modules.json.json", "Failed to load JSON from file",
     "prepare reads a JSON/JSONL file that is not one table (a bad line, a row that is no object) again "
     "row by row, and reports each bad row with its file and line itself"),
    ("mlflow.store.db.utils", "Creating initial MLflow database tables",
     "the first use of a new sqlite store (runs/<name>/mlflow.db)"),
    ("mlflow.store.db.utils", "Updating database tables", "the same schema set-up, second line"),
    ("mlflow.transformers", "Overriding save_pretrained to False for PEFT models",
     "promote logs the adapter without its base on purpose; the line says the base is referenced on the "
     "hub, while MLflow's next line names the local base it really references"),
    ("mlflow.transformers", "Saving only pipeline components",
     "repeats that line (the base model is referenced, not copied)"),
)  # fmt: skip

# (category, message regex, why it is dropped)
WARNINGS = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated",
     "PEFT 0.21 reads transformers' old attribute name when wrapping a model; our own code uses the new "
     "`activation_checkpointing` names"),
)  # fmt: skip


class _DropMessage(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def install() -> None:
    """Add the filters (idempotent). Output that is not a terminal (a log file, a Slurm job) also
    gets progress bars redrawn every 5 s rather than 10 times a second, at one position (a bar
    nested under another moves the cursor up with ``ESC[A``: debris in a file), and no bars for
    datasets' preprocessing passes (seconds each, one per eval source)."""
    for name, start, _why in LOG_MESSAGES:
        logger = logging.getLogger(name)
        if not any(getattr(known, "start", None) == start for known in logger.filters):
            logger.addFilter(_DropMessage(start))
    for category, pattern, _why in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_MININTERVAL", "5")
        os.environ.setdefault("TQDM_POSITION", "0")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
