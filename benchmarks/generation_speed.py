"""Answer generation speed on the CPU default: the base model, the tuned model as an unmerged UORA
adapter (how evaluate used to answer), and the same adapter merged in memory (how it answers now).

    python benchmarks/generation_speed.py          # writes benchmarks/results/generation_speed.md
    python benchmarks/generation_speed.py --adapter runs/smollm2-135m-uora/train/adapter

The three models sit in one process and are timed alternately (each repetition runs all three, in
a rotating order), so a neighbour's load hits them alike; the table reports the median of the
repetitions. Every call generates exactly ``--new-tokens`` tokens per prompt (greedy,
``min_new_tokens`` = ``max_new_tokens``), one prompt at a time and in batches like evaluate's
(the adapter's extra operations per layer weigh most when a batch is small). Without
``--adapter`` the adapter is the config's UORA r=64 on every linear layer with perturbed
(stand-in for trained) weights: speed does not depend on the values. The merged copy comes from
evaluate's own ``merge_verified`` (merged, then checked against the unmerged logits).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_models(config, adapter: str | None):
    from peft import PeftModel, get_peft_model

    import uora  # noqa: F401  (registers UORA with PEFT)
    from pipeline.adapters import build_peft_config
    from pipeline.models import load_model, load_tokenizer
    from pipeline.stages.evaluate import merge_verified

    tokenizer = load_tokenizer(config.model)
    base = load_model(config.model).eval()
    if adapter:
        unmerged = PeftModel.from_pretrained(load_model(config.model), adapter).eval()
        merged_source = PeftModel.from_pretrained(load_model(config.model), adapter).eval()
    else:
        unmerged = get_peft_model(load_model(config.model), build_peft_config(config.adapter))
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in unmerged.parameters():
                if param.requires_grad:
                    param.add_(torch.randn(param.shape, generator=generator) * 0.3)
        unmerged.eval()
        merged_source = get_peft_model(load_model(config.model), build_peft_config(config.adapter))
        merged_source.load_state_dict(unmerged.state_dict())
        merged_source.eval()
    merged, did_merge = merge_verified(merged_source, tokenizer, config)
    assert did_merge, "the merged copy failed its logit check"
    return tokenizer, {"base": base, "unmerged UORA": unmerged, "merged UORA": merged}


def prompts(tokenizer, count: int) -> list[str]:
    from pipeline.builtin_tasks import generate_tasks

    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": task["instruction"]}], tokenize=False, add_generation_prompt=True
        )
        for task in generate_tasks(count, seed=7)
    ]


def time_generation(model, batch, new_tokens: int, pad_id: int) -> float:
    started = time.perf_counter()
    with torch.no_grad():
        output = model.generate(
            **batch,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )
    seconds = time.perf_counter() - started
    assert output.shape[1] - batch["input_ids"].shape[1] == new_tokens
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "smollm2_135m.yaml"))
    parser.add_argument("--adapter", default=None, help="a trained adapter folder (default: stand-in)")
    parser.add_argument("--batch-sizes", default="1,16", help="comma-separated")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "generation_speed.md"))
    args = parser.parse_args()

    from pipeline.config import load_config

    config = load_config(args.config, [])
    load_start = os.getloadavg()[0]
    tokenizer, models = build_models(config, args.adapter)
    tokenizer.padding_side = "left"
    names = list(models)
    rows = [
        "| batch | model | tokens/s (median) | tokens/s (min–max) | time / base's |",
        "|---:|---|---:|---:|---:|",
    ]
    for batch_size in map(int, args.batch_sizes.split(",")):
        batch = tokenizer(
            prompts(tokenizer, batch_size), return_tensors="pt", padding=True, add_special_tokens=False
        )
        for name in names:  # warm-up, untimed
            time_generation(models[name], batch, 4, tokenizer.pad_token_id)
        seconds: dict[str, list[float]] = {name: [] for name in names}
        for repeat in range(args.repeats):
            for name in names[repeat % 3 :] + names[: repeat % 3]:
                seconds[name].append(
                    time_generation(models[name], batch, args.new_tokens, tokenizer.pad_token_id)
                )
                print(
                    f"batch {batch_size}, repeat {repeat + 1}: {name} {seconds[name][-1]:.2f} s", flush=True
                )
        tokens = batch_size * args.new_tokens
        base_median = statistics.median(seconds["base"])
        for name in names:
            median, spread = statistics.median(seconds[name]), f"{tokens / max(seconds[name]):.0f}–"
            spread += f"{tokens / min(seconds[name]):.0f}"
            rows.append(
                f"| {batch_size} | {name} | {tokens / median:.0f} | {spread} | {median / base_median:.2f} |"
            )
    adapter = args.adapter or (
        f"stand-in UORA r={config.adapter.r} on {config.adapter.target_modules} (perturbed weights)"
    )
    text = (
        "# Answer generation speed: base vs unmerged vs merged UORA\n\n"
        f"`python benchmarks/generation_speed.py`, {time.strftime('%Y-%m-%d')}, {os.uname().machine}, "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, 1-min load average "
        f"{load_start:.1f} at the start and {os.getloadavg()[0]:.1f} at the end. Model "
        f"{config.model.name_or_path} ({config.model.dtype}); adapter: {adapter}. Greedy, built-in task "
        f"prompts, exactly {args.new_tokens} new tokens each; per batch size {args.repeats} repetitions "
        "of all three models, alternating, median shown.\n\n" + "\n".join(rows) + "\n"
    )
    Path(args.out).write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
