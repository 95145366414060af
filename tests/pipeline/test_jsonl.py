"""The one JSON Lines reader: strict readers name file and line, caches skip a cut last line."""

from __future__ import annotations

import pytest

from pipeline.errors import StageError
from pipeline.eval.generate import read_cache
from pipeline.jsonl import append_record, read_jsonl, rewrite_records


def test_strict_read_names_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"a": \n', encoding="utf-8")
    with pytest.raises(StageError) as error:
        read_jsonl(path, "promote")
    assert str(error.value) == f"{path}:3: invalid JSON (Expecting value)"
    with pytest.raises(StageError, match=r"^eval.questions: file not found: .*nowhere.jsonl$"):
        read_jsonl(tmp_path / "nowhere.jsonl", "eval.questions")
    assert read_jsonl(path, "x", skip_invalid=True) == [(f"{path}:1", {"a": 1})]


def test_cache_round_trip_keeps_line_separators_inside_strings(tmp_path):
    """Records are written with ensure_ascii=False, so U+2028 (a line break to str.splitlines) can
    sit inside an answer; the reader splits on newlines only and keeps the record."""
    path = tmp_path / "cache" / "answers.jsonl"
    first = {"cache_key": "k1", "text": "one\u2028two"}
    append_record(path, first)
    append_record(path, {"cache_key": "k2", "text": "é"})
    with path.open("a", encoding="utf-8") as handle:
        handle.write('{"cache_key": "k3", "te')  # killed mid-write
    assert read_cache(path) == {"k1": first, "k2": {"cache_key": "k2", "text": "é"}}
    rewrite_records(path, [first])
    assert read_cache(path) == {"k1": first} and read_cache(tmp_path / "none.jsonl") == {}
