"""Export on the CPU default (SmolLM2-135M-Instruct): how long merge-and-export takes, and how much
better merging into a float reload is than merging into the int8 base an adapter was trained on.

    python benchmarks/export_smollm2.py   # prints tables; writes benchmarks/results/export_smollm2.md

Part 1 runs the export stage itself (configs/smollm2_135m.yaml's model and export sections) on
hand-made adapters of each method with perturbed weights (stand-ins for trained ones), timing the
whole stage. Part 2 builds a LoRA adapter on an 8-bit (bitsandbytes) base and compares, against
float32 base + adapter, (a) export's merge into a float32 reload and (b) PEFT's merge into the
int8 weights: max |logit error| and top-1 agreement over every position of the check prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "Name a colour.",
    "How many legs does a spider have? Answer briefly.",
    "Convert 3 hours into minutes.",
    "Write one sentence about the sea.",
]


def perturb(model, scale: float, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * scale)


def logits(model, tokenizer) -> torch.Tensor:
    rows = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            )["input_ids"]
            rows.append(model(input_ids=ids).logits[0].float())
    return torch.cat(rows)


def peft_config(method: str, r: int):
    if method == "uora":
        import uora

        return uora.UoraConfig(r=r, target_modules="all-linear", task_type="CAUSAL_LM")
    if method == "vera":
        from peft import VeraConfig

        return VeraConfig(r=r, target_modules="all-linear", task_type="CAUSAL_LM")
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="CAUSAL_LM")


def export_timing(config_path: Path, methods: list[str], dtypes: list[str]) -> list[dict]:
    from peft import get_peft_model

    from pipeline.config import load_config
    from pipeline.models import load_model, load_tokenizer
    from pipeline.stages import export
    from pipeline.stages.base import StageContext

    rows = []
    for method in methods:
        for dtype in dtypes:
            with tempfile.TemporaryDirectory() as tmp:
                config = load_config(config_path, [f"export.dtype={dtype}"])
                run_dir = Path(tmp)
                base = load_model(config.model, quantize=False)
                r = config.adapter.r if method == "uora" else (8 if method == "lora" else 256)
                model = get_peft_model(base, peft_config(method, r))
                perturb(model, 0.02 if method == "lora" else 0.3)
                model.save_pretrained(run_dir / "train" / "adapter")
                load_tokenizer(config.model).save_pretrained(run_dir / "train" / "adapter")
                del model, base
                ctx = StageContext(config=config, run_dir=run_dir, work_dir=run_dir / "export.partial")
                started = time.perf_counter()
                result = export.run(ctx)
                seconds = time.perf_counter() - started
                report = result.extra["verification"]
                size = sum(p.stat().st_size for p in (ctx.work_dir / "merged").glob("*.safetensors"))
                rows.append(
                    {
                        "method": f"{method} r={r}",
                        "dtype": dtype,
                        "export_s": round(seconds, 1),
                        "rel_error": f"{report['rel_error']:.2e}",
                        "tolerance": report["tolerance"],
                        "top1": f"{report['top1_agreement']:.3f}",
                        "adapter_effect_rel": f"{report['adapter_effect_rel']:.2e}",
                        "merged_MB": round(size / 2**20),
                    }
                )
                print(rows[-1], flush=True)
    return rows


def int8_comparison(model_dir: str, tokenizer) -> list[dict]:
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    int8 = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True), dtype=torch.float32
    )
    trained = get_peft_model(int8, peft_config("lora", 8))
    perturb(trained, 0.01)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        trained.save_pretrained(tmp)
        trained.eval()
        on_int8 = logits(trained, tokenizer)
        fp32 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        reference_model = PeftModel.from_pretrained(fp32, tmp).eval()
        reference = logits(reference_model, tokenizer)
        with reference_model.disable_adapter():
            base_only = logits(reference_model, tokenizer)
        float_merge = logits(reference_model.merge_and_unload(), tokenizer)
    int8_merge = logits(trained.merge_and_unload(), tokenizer)

    def top1(a: torch.Tensor, b: torch.Tensor) -> str:
        return f"{float((a.argmax(-1) == b.argmax(-1)).float().mean()):.3f}"

    for name, candidate in (
        ("export: merge into float32 reload", float_merge),
        ("PEFT merge into int8 weights", int8_merge),
        ("int8 base + adapter, unmerged", on_int8),
        ("float32 base without adapter", base_only),
    ):
        rows.append(
            {
                "model": name,
                "max_abs_error": f"{float((candidate - reference).abs().max()):.3g}",
                "top1_vs_fp32+adapter": top1(candidate, reference),
                "top1_vs_int8+adapter": top1(candidate, on_int8),
            }
        )
        print(rows[-1], flush=True)
    return rows


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "smollm2_135m.yaml"))
    parser.add_argument("--methods", default="uora,lora,vera")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "export_smollm2.md"))
    args = parser.parse_args()

    from pipeline.config import load_config
    from pipeline.models import load_tokenizer, resolve_model_dir

    config = load_config(args.config)
    timing = export_timing(Path(args.config), args.methods.split(","), args.dtypes.split(","))
    tokenizer = load_tokenizer(config.model)
    quality = int8_comparison(resolve_model_dir(config.model), tokenizer)
    text = "\n".join(
        [
            "# Export on SmolLM2-135M-Instruct (CPU)",
            "",
            f"`python benchmarks/export_smollm2.py` — torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, load average at the end "
            f"{os.getloadavg()[0]:.1f} (the machine was shared: times are upper bounds). "
            "Adapters have perturbed (not trained) weights.",
            "",
            "## Export stage: wall time and verification",
            "",
            "Whole stage: copy adapter, load base, reference logits, merge, save sharded safetensors, "
            "reload from disk, compare. `rel_error` = max |merged − (base + adapter)| / max |reference|.",
            "",
            table(timing),
            "",
            "## LoRA trained on an 8-bit base: where to merge",
            "",
            "Errors against float32 base + adapter over every position of 4 chat prompts.",
            "",
            table(quality),
            "",
        ]
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    print(json.dumps({"written": args.out}))
    print(text)


if __name__ == "__main__":
    main()
