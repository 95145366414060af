"""Identities of the models in an evaluation, for cache keys.

An answer is reusable only if it came from the same weights with the same chat template; these
functions describe "the same" cheaply (paths, revisions, content digests of the small files that
change when weights change) without loading anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.digests import folder_digest, sha256

if TYPE_CHECKING:
    from pipeline.config import ModelConfig


def weights_digest(folder: Path) -> str:
    """sha256 over the names and contents of a model/adapter folder's weight and config files."""
    patterns = ("*.json", "*.safetensors", "*.jinja")
    return folder_digest(folder, [p for pattern in patterns for p in sorted(folder.glob(pattern))], b"")


def model_identity(config: ModelConfig) -> str:
    """The base model as configured: where its weights come from and how they are loaded."""
    from pipeline.models import read_chat_template, resolve_model_dir

    location = resolve_model_dir(config)  # a GGUF's cached folder name carries its content digest
    payload: dict[str, Any] = {
        "location": location,
        "revision": config.revision,
        "dtype": config.dtype,
        "load_in_8bit": config.load_in_8bit,
        "chat_template": sha256(read_chat_template(config) or ""),
    }
    return sha256(repr(sorted(payload.items())))
