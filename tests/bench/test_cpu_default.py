"""benchmarks/cpu_default.py's table: stage times from the manifests, their sum against 15 minutes."""

from __future__ import annotations

import json

from benchmarks import cpu_default


def _write_manifests(run_dir, seconds):
    for stage, duration in zip(cpu_default.STAGES, seconds, strict=True):
        (run_dir / stage).mkdir(parents=True)
        (run_dir / stage / "manifest.json").write_text(json.dumps({"stage": stage, "duration_s": duration}))


def test_report_sums_the_stages_and_judges_the_target(tmp_path):
    _write_manifests(tmp_path, [4.5, 127.0, 197.1, 5.3, 2.1])
    rows = cpu_default.stage_rows(tmp_path)
    assert [stage for stage, _, _ in rows] == list(cpu_default.STAGES)
    text = cpu_default.report(rows, 340.0, (0.5, 1.9))
    assert "| **all stages** | **336.0** |" in text and ": met (5.6 min;" in text
    slow = cpu_default.report([("train", 900.5, {})], 901.0, (0.5, 1.9))
    assert ": MISSED (15.0 min;" in slow  # 900.5 s is over 900
