"""Does the CPU default (configs/smollm2_135m.yaml) finish every stage within 15 minutes on 2 cores?

Runs ``python -m pipeline run`` on the CPU default in a fresh run directory (installation and the
one-off GGUF conversion are not counted: they are cached), reads each stage's time from its
``manifest.json`` and prints a table against the target; writes benchmarks/results/cpu_default.md.
Run from the repository root: ``python benchmarks/cpu_default.py [key=value overrides]``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/smollm2_135m.yaml"
STAGES = ("prepare", "train", "evaluate", "export", "promote")
TARGET_S = 15 * 60


def stage_rows(run_dir: Path) -> list[tuple[str, float, dict]]:
    """(stage, seconds, metrics) from each stage's manifest, in pipeline order."""
    rows = []
    for stage in STAGES:
        manifest = json.loads((run_dir / stage / "manifest.json").read_text(encoding="utf-8"))
        rows.append((stage, float(manifest["duration_s"]), manifest.get("metrics", {})))
    return rows


def report(rows: list[tuple[str, float, dict]], wall_s: float, loads: tuple[float, float]) -> str:
    total = sum(seconds for _, seconds, _ in rows)
    verdict = "met" if total <= TARGET_S else "MISSED"
    return "\n".join([
        "# CPU default: every stage, one run",
        "",
        f"`python benchmarks/cpu_default.py` on {CONFIG}: {platform.machine()}, "
        f"{os.cpu_count()} CPUs visible, "
        f"1-min load average {loads[0]:.1f} before and {loads[1]:.1f} after. Model conversion cached.",
        "",
        "| stage | seconds |",
        "|---|---:|",
        *[f"| {stage} | {seconds:.1f} |" for stage, seconds, _ in rows],
        f"| **all stages** | **{total:.1f}** |",
        "",
        f"Target: all stages within {TARGET_S // 60} minutes on 2 cores: {verdict} ({total / 60:.1f} min; "
        f"the driver's wall time including start-up {wall_s:.1f} s).",
        "",
    ])  # fmt: skip


def main(overrides: list[str]) -> int:
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pipeline", "run", CONFIG, f"run.output_dir={tmp}", *overrides]
        started = time.perf_counter()
        subprocess.run(command, cwd=REPO, check=True)
        wall = time.perf_counter() - started
        run_dir = next(path.parent for path in Path(tmp).glob("*/prepare"))
        text = report(stage_rows(run_dir), wall, (load_before, os.getloadavg()[0]))
    print(text)
    out = REPO / "benchmarks" / "results" / "cpu_default.md"
    out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
