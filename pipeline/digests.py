"""sha256 digests of bytes, JSON values, files and folders. The encodings are persisted (manifests, train's
identity, evaluate's caches, export's lineage): a change re-runs or orphans users' work (tests pin them)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def sha256(*parts: bytes | str) -> str:
    """sha256 of the parts one after the other (text as UTF-8), hex."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
    return digest.hexdigest()


def digest_of(value: Any, *, compact: bool = True) -> str:
    """sha256 of a JSON-able value with sorted keys. ``compact``: no spaces, ASCII escapes, other values
    as ``str`` (config digests); else json.dumps' separators, non-ASCII kept (evaluate's cache keys)."""
    options = {"separators": (",", ":"), "default": str} if compact else {"ensure_ascii": False}
    return sha256(json.dumps(value, sort_keys=True, **options))


def file_digest(path: str | os.PathLike[str], digest: Any = None) -> str:
    """sha256 of a file's content, hex (read in 1 MiB chunks; fed into ``digest`` if given)."""
    digest = digest or hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def folder_digest(folder: Path, paths: Iterable[Path] | None = None, separator: bytes = b"\0") -> str:
    """sha256 of each file's path relative to ``folder``, ``separator``, content (``paths``: all, sorted)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()) if paths is None else paths:
        digest.update(path.relative_to(folder).as_posix().encode() + separator)
        file_digest(path, digest)
    return digest.hexdigest()
