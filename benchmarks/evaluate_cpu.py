"""How long the evaluate stage takes on the CPU default (configs/smollm2_135m.yaml), phase by phase.

The CPU default must finish every stage in 15 minutes on 2 cores; this measures evaluate's share:
answer generation for base and tuned (a LoRA adapter with random weights stands in for the trained
one: same shapes, same cost) and judging with the local logit-scored SmolLM2 judge. Fresh caches
every time. Prints a table and writes benchmarks/results/evaluate_cpu.md. Run from the repository
root: ``python benchmarks/evaluate_cpu.py [key=value overrides]``.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/smollm2_135m.yaml"


def main(overrides: list[str]) -> None:
    load_before = os.getloadavg()[0]
    sys.path.insert(0, str(REPO))
    import torch

    from pipeline.config import load_config
    from pipeline.eval.judging import build_tasks, run_judging
    from pipeline.eval.prompts import load_prompts
    from pipeline.eval.questions import load_questions
    from pipeline.models import resolve_model_dir
    from pipeline.stages.evaluate import _local_judge, generate_all
    from tests.evaluate.conftest import make_lora_adapter

    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(REPO / CONFIG, [f"run.output_dir={tmp}", *overrides])
        work = Path(tmp) / "work"
        adapter = make_lora_adapter(Path(resolve_model_dir(config.model)), Path(tmp) / "adapter")
        questions = load_questions(config.eval)
        turns = sum(len(q.turns) for q in questions)
        rows = []
        answers = {}
        for model in ("base", "tuned"):
            only = config.model_copy(deep=True)
            only.eval.models = [model]
            started = time.perf_counter()
            answers.update(
                generate_all(only, questions, work / "answers", adapter if model == "tuned" else None)
            )
            seconds = time.perf_counter() - started
            rows.append((f"answers: {model} (incl. model load)", seconds, seconds / len(questions)))
        started = time.perf_counter()
        judge = _local_judge(config)
        tasks = build_tasks(questions, answers, load_prompts(None), judge.identity(), 1)
        run_judging(judge, tasks, work / "judgments.jsonl", 1)
        seconds = time.perf_counter() - started
        rows.append(
            (f"judging: {len(tasks)} judgments (incl. judge load)", seconds, seconds / len(questions))
        )
        total = sum(r[1] for r in rows)
        rows.append(("total", total, total / len(questions)))

    lines = [
        "# evaluate stage on the CPU default",
        "",
        f"{len(questions)} questions ({turns} turns per model), max_new_tokens={config.eval.max_new_tokens}, "
        f"batch_size={config.eval.batch_size}, local SmolLM2 judge ({config.eval.judge.local_scoring}). "
        f"Host: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
        f"torch threads {torch.get_num_threads()}, 1-min load average at start {load_before:.1f}.",
        "",
        "| phase | seconds | seconds per question |",
        "|---|---|---|",
        *[f"| {name} | {seconds:.1f} | {per:.2f} |" for name, seconds, per in rows],
        "",
    ]
    text = "\n".join(lines)
    print(text)
    out = REPO / "benchmarks" / "results" / "evaluate_cpu.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1:])
