"""Training throughput of the pipeline's adapters on a Llama-2-7B-shaped model with random weights.

Part (c) of the GPU kit (``benchmarks/gpu/run.sh``); no download: the model is built on the device
from its shape, in bf16, and for the 8-bit base quantised layer by layer the way transformers does
on load (``Linear8bitLt``, threshold 6.0, weights moved from the CPU to the GPU as ``Int8Params``),
then prepared with PEFT's ``prepare_model_for_kbit_training`` as the train stage does. Each
configuration trains the adapter the pipeline would build (``pipeline.adapters.build_peft_config``
on the adapter section of ``configs/llama2_7b.yaml``, method and r replaced) with gradient
checkpointing, bf16 autocast and AdamW, on random token ids.

Batch: as large as fits. Steps at batch 1 and 2 measure the peak memory per sequence; the largest
batch predicted to fit in 92% of the card's memory is tried and backed off by 20% per OOM. A time
cap also bounds it, so that every configuration fits its share of the deadline (the cap is
recorded). MFU counts the frozen base's model FLOPs per token only (see ``base_flops``): the
adapters' own FLOPs are overhead, so MFU is proportional to tokens/s across methods.

    python benchmarks/gpu/throughput.py --base bf16 --deadline EPOCH_S --out rows.jsonl [--tiny]

Each configuration appends one JSON line to ``--out`` as soon as it is measured, so a kill keeps
what was done.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

LLAMA2_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
)
METHODS = (("uora", 1024), ("uora", 256), ("vera", 1024), ("lora", 64))
TINY_METHODS = (("uora", 16), ("uora", 8), ("vera", 16), ("lora", 4))
MEMORY_SHARE = 0.92  # of the card's memory that the predicted peak may use
TIMED_STEPS = 2


def base_flops(shape: dict[str, int], seq_len: int) -> dict[str, float]:
    """FLOPs per token of training with a frozen base (2 FLOPs per multiply-add).

    N = the decoder's linear weights + the output head (embedding lookups are free). The forward
    costs 2N, the backward only the input gradients, another 2N (no weight gradients for frozen
    weights). Attention's score and value products cost 4·s·d per token and layer forward and twice
    that backward: 12·L·s·d, counted over the full s×s square (PaLM's convention; causal kernels
    skip half). Gradient checkpointing recomputes each decoder layer's forward once more:
    ``hardware`` adds 2·N_layers + 4·L·s·d.
    """
    d, layers, ff, vocab = (
        shape[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
    )
    kv = d * shape["num_key_value_heads"] // shape["num_attention_heads"]
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * ff  # q, k, v, o, gate, up, down
    n_layers, n_head = layers * per_layer, d * vocab
    attention = 4 * layers * seq_len * d
    model = 4 * (n_layers + n_head) + 3 * attention
    return {
        "model": float(model),
        "hardware": float(model + 2 * n_layers + attention),
        "params_linear": float(n_layers + n_head),
    }


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 tensor-core peak (no sparsity) of known cards, from NVIDIA's data sheets."""
    name = device_name.upper()
    if "H100" in name and "PCIE" in name:
        return 756.0
    if "H100" in name or "H200" in name or "GH200" in name:
        return 989.4  # SXM; the H100 80GB HBM3 and H200 report no "SXM" in their names
    if "A100" in name:
        return 312.0
    return None


def find_batch(
    step: Callable[[int], float],
    peak_bytes: Callable[[], int],
    capacity: int | None,
    cap: Callable[[float], int],
    oom: type[BaseException],
    cleanup: Callable[[], None],
) -> tuple[int, float, dict[str, Any]]:
    """The largest batch whose training step fits: see the module docstring.

    ``step(b)`` runs one step and returns its seconds; ``peak_bytes()`` the peak since the last
    step began; ``capacity`` the bytes the peak may reach (None: unknown, as on the CPU: the time
    cap alone decides); ``cap(seconds of a batch-2 step)`` the largest batch the time budget allows.
    Returns (batch, seconds of its first step, notes).
    """
    peaks, seconds = {}, {}
    for b in (1, 2):
        seconds[b] = step(b)
        peaks[b] = peak_bytes()
    per_sequence = max(peaks[2] - peaks[1], 1)
    fits = 2 + max(0, int((capacity - peaks[2]) / per_sequence)) if capacity is not None else None
    time_cap = max(2, cap(seconds[2]))
    batch = min(fits or time_cap, time_cap)
    notes: dict[str, Any] = {"predicted_fit": fits, "time_cap": time_cap, "ooms": []}
    while True:
        failed = False
        try:
            return batch, step(batch), notes
        except oom:
            failed = True
        if failed:  # outside the except block, so the traceback's tensors are gone
            cleanup()
            notes["ooms"].append(batch)
            if batch <= 2:
                raise RuntimeError("out of memory at batch 2, which fitted a moment ago")
            batch = max(2, int(batch * 0.8))


def build_base(shape: dict[str, int], base: str, device: Any) -> Any:
    """A random-weight Llama in bf16 on ``device``; for ``int8`` its linear layers (not lm_head)
    quantised as transformers' bitsandbytes integration does when loading in 8 bits."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**shape, use_cache=False, attn_implementation="sdpa")
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    if base == "int8":
        import bitsandbytes as bnb
        from peft import prepare_model_for_kbit_training

        for name, module in list(model.named_modules()):
            if type(module) is not torch.nn.Linear or name.endswith("lm_head"):
                continue
            with torch.device("meta"):
                quantised = bnb.nn.Linear8bitLt(
                    module.in_features,
                    module.out_features,
                    module.bias is not None,
                    has_fp16_weights=False,
                    threshold=6.0,
                )
            weight = module.weight.detach().to("cpu")
            int8 = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            quantised.weight = int8.to(device)  # quantises: from the CPU to a device
            quantised.requires_grad_(False)
            model.set_submodule(name, quantised)
            del module, weight
        model.is_loaded_in_8bit = True  # what transformers' 8-bit quantizer sets after loading
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    else:
        model.requires_grad_(False)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def adapter_section(method: str, r: int) -> Any:
    """The adapter section of configs/llama2_7b.yaml with method and r replaced (and all-linear); its
    dropout (0.05) becomes the method's own dropout key."""
    import yaml

    from pipeline.config import apply_override
    from pipeline.schema import ADAPTERS

    data = {"adapter": yaml.safe_load((REPO / "configs" / "llama2_7b.yaml").read_text())["adapter"]}
    dropout = data["adapter"]["uora_dropout"]
    apply_override(data, f"adapter.method={method}")  # drops the keys that only UORA has
    data["adapter"].update({"r": r, "target_modules": "all-linear", f"{method}_dropout": dropout})
    return ADAPTERS[method].model_validate(data["adapter"])


def measure(
    model: Any,
    method: str,
    r: int,
    args: argparse.Namespace,
    device: Any,
    budget_s: float,
    shape: dict[str, int],
) -> dict[str, Any]:
    """Wrap ``model`` with the adapter, find the batch, time the steps; the model is unwrapped
    again (in place) however it ends."""
    import torch
    from peft import get_peft_model

    from pipeline.adapters import build_peft_config

    began = time.perf_counter()
    peft_model = get_peft_model(model, build_peft_config(adapter_section(method, r), task_type="CAUSAL_LM"))
    try:
        return _measure(peft_model, method, r, args, device, budget_s, shape, began)
    finally:
        peft_model.unload()  # the base modules back in place, in ``model``
        leftover = [n for n, _ in model.named_modules() if any(t in n for t in ("lora_", "vera_", "uora_"))]
        del peft_model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if leftover:
            raise RuntimeError(f"adapter modules left after unload: {leftover[:3]}")


def _measure(
    peft_model: Any,
    method: str,
    r: int,
    args: argparse.Namespace,
    device: Any,
    budget_s: float,
    shape: dict[str, int],
    began: float,
) -> dict[str, Any]:
    import torch

    import uora

    cuda = device.type == "cuda"
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
    generator = torch.Generator(device=device).manual_seed(0)

    def step(batch: int) -> float:
        ids = torch.randint(shape["vocab_size"], (batch, args.seq_len), device=device, generator=generator)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if method == "uora":
            uora.reinit_step(peft_model)
        if cuda:
            torch.cuda.synchronize()
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"non-finite loss {loss.item()}")
        return time.perf_counter() - start

    def cleanup() -> None:
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    def time_cap(seconds_at_2: float) -> int:
        # Step time grows at most linearly with batch; keep the chosen batch's first (warm-up)
        # and timed steps inside what is left of this configuration's budget.
        left = budget_s - (time.perf_counter() - began)
        return min(args.max_batch, int(2 * left / ((TIMED_STEPS + 1) * max(seconds_at_2, 1e-6))))

    peak = (lambda: torch.cuda.max_memory_allocated()) if cuda else (lambda: 0)
    capacity = int(torch.cuda.get_device_properties(device).total_memory * MEMORY_SHARE) if cuda else None
    batch, _, notes = find_batch(step, peak, capacity, time_cap, torch.OutOfMemoryError, cleanup)
    timed = [step(batch) for _ in range(TIMED_STEPS)]
    seconds = sum(timed) / len(timed)
    tokens_per_s = batch * args.seq_len / seconds
    flops = base_flops(shape, args.seq_len)
    peak_tf = peak_tflops(args.device_name) if cuda else None
    return {
        "method": method,
        "r": r,
        "base": args.base,
        "seq_len": args.seq_len,
        "batch": batch,
        "tokens_per_s": tokens_per_s,
        "seconds_per_step": seconds,
        "step_seconds": timed,
        "mfu_pct": 100 * tokens_per_s * flops["model"] / (peak_tf * 1e12) if peak_tf else None,
        "hfu_pct": 100 * tokens_per_s * flops["hardware"] / (peak_tf * 1e12) if peak_tf else None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "trainable_params": sum(p.numel() for p in params),
        "flops_per_token": flops,
        "peak_tflops": peak_tf,
        "seconds_total": time.perf_counter() - began,
        "status": "ok",
        **notes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", choices=("bf16", "int8"), required=True)
    parser.add_argument("--deadline", type=float, required=True, help="epoch seconds: stop starting configs")
    parser.add_argument("--out", type=Path, required=True, help="JSON lines, one per configuration")
    parser.add_argument("--tiny", action="store_true", help="rehearsal: tiny Llama on the CPU")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--max-batch", type=int, default=None)
    args = parser.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    shape = TINY if args.tiny else LLAMA2_7B
    methods = TINY_METHODS if args.tiny else METHODS
    args.seq_len = args.seq_len or (64 if args.tiny else 1024)
    args.max_batch = args.max_batch or (4 if args.tiny else 256)
    args.device_name = torch.cuda.get_device_name(device) if cuda else "cpu"

    def emit(row: dict[str, Any]) -> None:
        with args.out.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        shown = {
            k: (round(v, 3) if isinstance(v, float) else v)
            for k, v in row.items()
            if k not in ("flops_per_token", "step_seconds")
        }
        print("[throughput]", json.dumps(shown), flush=True)

    started = time.perf_counter()
    model = build_base(shape, args.base, device)
    built = time.perf_counter() - started
    print(f"[throughput] {args.base} base built in {built:.1f}s on {args.device_name}", flush=True)
    for index, (method, r) in enumerate(methods):
        left = args.deadline - time.time()
        budget = left / (len(methods) - index)
        skeleton = {"method": method, "r": r, "base": args.base, "seq_len": args.seq_len}
        if budget < (2 if args.tiny else 12):
            emit({**skeleton, "status": "not run: time budget"})
            continue
        try:
            row = measure(model, method, r, args, device, budget, shape)
        except Exception as error:  # one configuration's failure must not stop the others
            emit({**skeleton, "status": f"failed: {type(error).__name__}: {str(error)[:300]}"})
            print(f"[throughput] {method} r={r} failed", file=sys.stderr, flush=True)
            import traceback

            traceback.print_exc()
            if "CUDA error" in str(error):  # the context is gone; nothing else can run in it
                return 1
            continue
        emit(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
