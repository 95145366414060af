"""Model identities for cache keys: an answer is reusable only from the same weights and chat template,
described cheaply (paths, revisions, digests of the small files that change with the weights), unloaded."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.digests import folder_digest, sha256
from pipeline.models import read_chat_template, resolve_model_dir

if TYPE_CHECKING:
    from pipeline.config import ModelConfig


def weights_digest(folder: Path) -> str:
    """sha256 over the names and contents of a model/adapter folder's weight and config files."""
    files = [p for pattern in ("*.json", "*.safetensors", "*.jinja") for p in sorted(folder.glob(pattern))]
    return folder_digest(folder, files, b"")


def model_identity(config: ModelConfig) -> str:
    """The base model as configured: where its weights come from (a GGUF's cached folder name carries
    its content digest) and how they are loaded."""
    payload = {"location": resolve_model_dir(config), "revision": config.revision, "dtype": config.dtype,
               "load_in_8bit": config.load_in_8bit, "chat_template": sha256(read_chat_template(config) or "")}
    return sha256(repr(sorted(payload.items())))
