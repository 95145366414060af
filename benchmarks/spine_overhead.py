"""How much the pipeline's frame costs: config validation, and data prep on the CPU default.

Prints a table and writes benchmarks/results/spine_overhead.md. Run from the repository root:
``python benchmarks/spine_overhead.py``.
"""

from __future__ import annotations

import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/smollm2_135m.yaml"
PROBE = (
    "import sys, time; t = time.perf_counter(); from pipeline.__main__ import main; "
    f"main(['validate', '{CONFIG}']); print('ELAPSED', time.perf_counter() - t)"
)


def timed(command: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    return time.perf_counter() - started, result.stdout


def main() -> None:
    sys.path.insert(0, str(REPO))
    rows: list[tuple[str, str]] = []
    walls, inside = [], []
    for _ in range(5):
        wall, out = timed([sys.executable, "-c", PROBE])
        walls.append(wall)
        inside.append(float(next(line for line in out.splitlines() if line.startswith("ELAPSED")).split()[1]))
    rows.append(("`validate` in-process (import + load + checks), median of 5",
                 f"{statistics.median(inside):.3f} s"))  # fmt: skip
    rows.append(("`python -m pipeline validate` wall time incl. interpreter, median of 5",
                 f"{statistics.median(walls):.3f} s"))  # fmt: skip

    from pipeline.config import load_config
    from pipeline.models import load_tokenizer
    from pipeline.stages import prepare

    config = load_config(REPO / CONFIG)
    started = time.perf_counter()
    tokenizer = load_tokenizer(config.model)
    seconds = time.perf_counter() - started
    rows.append(("load SmolLM2 tokenizer (converted GGUF already cached)", f"{seconds:.2f} s"))
    with tempfile.TemporaryDirectory() as cache:
        config = config.model_copy(update={"data": config.data.model_copy(update={"cache_dir": cache})})
        started = time.perf_counter()
        folder, hit = prepare.prepare_cached(config, tokenizer)
        cold = time.perf_counter() - started
        assert not hit
        started = time.perf_counter()
        _, hit = prepare.prepare_cached(config, tokenizer)
        warm = time.perf_counter() - started
        assert hit
        import json

        stats = json.loads((folder / "stats.json").read_text())
    rows.append((f"prepare, CPU default data ({stats['rows_in']['total']} built-in rows → "
                 f"{stats['rows_out']['train']} train + {stats['rows_out']['eval']} eval), cold cache",
                 f"{cold:.2f} s"))  # fmt: skip
    rows.append(("prepare, same config, cache hit", f"{warm:.3f} s"))
    rows.append(("token length p50 / p99 / max (CPU default data)",
                 f"{stats['token_length']['p50']:.0f} / {stats['token_length']['p99']:.0f} / "
                 f"{stats['token_length']['max']:.0f}"))  # fmt: skip

    import os

    header = (f"machine: {platform.machine()}, {os.cpu_count()} cores (shared while measured), "
              f"Python {platform.python_version()}")  # fmt: skip
    table = ["| measurement | value |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]
    text = f"# Spine overhead\n\n{header}\n\n" + "\n".join(table) + "\n"
    print(text)
    out = REPO / "benchmarks" / "results" / "spine_overhead.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
