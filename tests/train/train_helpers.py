"""Helpers for the train-stage tests: a prepared-data folder, a run config, a StageContext."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.stages.base import StageContext


def make_messages(n: int, seed: int) -> list[list[dict[str, str]]]:
    """Deterministic, learnable chat rows (arithmetic with a fixed answer format)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        messages = [
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
        ]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "Answer in one sentence."})
        rows.append(messages)
    return rows


def write_prepared(run_dir: Path, n_train: int = 32, n_eval: int = 8) -> Path:
    """``<run_dir>/prepare/dataset`` as the prepare stage writes it."""
    from datasets import Dataset, DatasetDict

    def split(n: int, seed: int) -> Dataset:
        rows = make_messages(n, seed)
        return Dataset.from_dict({"messages": rows, "source": ["test"] * n, "answer": [None] * n})

    target = run_dir / "prepare" / "dataset"
    DatasetDict({"train": split(n_train, 0), "eval": split(n_eval, 1)}).save_to_disk(str(target))
    return target


def make_config(run_dir: Path, model_path: str, **sections: dict[str, Any]) -> PipelineConfig:
    raw: dict[str, Any] = {
        "run": {"name": run_dir.name, "output_dir": str(run_dir.parent), "seed": 7},
        "model": {"name_or_path": model_path},
        "adapter": {"method": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
        "train": {
            "max_steps": 4,
            "per_device_train_batch_size": 2,
            "per_device_eval_batch_size": 4,
            "max_length": 64,
            "logging_steps": 1,
            "save_steps": 100,
            "learning_rate": 1e-2,
            "warmup_steps": 0.0,
            "max_grad_norm": 0.0,
            "omp_num_threads": 1,
        },
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return PipelineConfig.model_validate(raw)


def make_ctx(run_dir: Path, config: PipelineConfig, **kwargs: Any) -> StageContext:
    return StageContext(config=config, run_dir=run_dir, work_dir=run_dir / "train.partial", **kwargs)


def forced_projections(a_shape: tuple[int, ...], b_shape: tuple[int, ...], layers: int, steps: int,
                       alpha: float = 0.5) -> tuple[Any, Any]:  # fmt: skip
    """UORA's (A, B) after ``steps`` checks in which every slot of all ``layers`` layers had an event
    (threshold above every |d|, patience 1, fixed target, seeds 0), interpolated in float64."""
    from uora.init import derived_seed, init_projection_pair

    (r, n_in), n_out = a_shape, b_shape[0]
    a, b = (t.double() for t in init_projection_pair(r, n_in, n_out, 0))
    target_a, target_b = (t.double() for t in init_projection_pair(r, n_in, n_out, derived_seed(0, 0)))
    keep = alpha**layers
    for _ in range(steps):
        a, b = keep * a + (1 - keep) * target_a, keep * b + (1 - keep) * target_b
    return a.float(), b.float()
