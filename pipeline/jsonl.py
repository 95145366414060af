"""JSON Lines (questions, answers, judgments, ...): a reader naming ``file:line``, a cache's two writers."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.errors import StageError


def read_jsonl(path: Path, what: str, skip_invalid: bool = False) -> list[tuple[str, Any]]:
    """Parsed rows with their ``file:line`` location; ``skip_invalid`` drops lines that do not parse
    (a cache's last line, cut by a kill mid-write) instead of failing on them."""
    if not path.is_file():
        raise StageError(f"{what}: file not found: {path}")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        try:
            if line.strip():
                rows.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as error:
            if not skip_invalid:
                raise StageError(f"{path}:{number}: invalid JSON ({error.msg})") from None
    return rows


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line and flush it, so a kill loses at most the line being written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def rewrite_records(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Replace the file, atomically, with exactly ``records`` (drops stale and superseded lines)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)
