"""Pre-flight plan (``python -m pipeline plan``): will this config fit these GPUs, and how long will it take?
DeepSpeed's estimators count full fine-tuning, accelerate's only inference weights; a PEFT run is a frozen
(maybe 8-bit) base, a small adapter, activations and the LM head, from shapes (PEFT applied on the meta
device: exact counts). GiB (2^30 bytes, as ``--gpu-memory``) per GPU, all parts live at once (the backward's
start). Autograd saves per token and layer (HF Llama + SDPA, pinned by tests/pipeline/test_plan.py; e = 2
bytes under bf16/fp16, else the base dtype's; a = 2 under bf16/fp16, else 4: PEFT keeps fp32):
  2·(4h + 4)             two RMSNorms: fp32 input and rsqrt
  4e·h + 4·heads + e·s   SDPA: q, k, v, output, logsumexp; no s² term (a padding/packing mask makes
                         transformers repeat GQA's k/v to h and SDPA build the mask per layer)
  3e·i                   SwiGLU: gate, silu(gate), up
  per adapted module     LoRA a·(in + r) (q/k/v and gate/up share an input nothing casts), UORA/VeRA
                         a·(r + out); dropout adds its mask (and LoRA's dropped input)
plus 16-bit copies of the adapter matrices under autocast (bf16/fp16 without DeepSpeed): Korthikanti et
al. 2022 adapted to SwiGLU, RMSNorm and SDPA. Checkpointing keeps e·h per layer + one layer recomputed.
Logits: TRL's fused LM head builds tiles of min(tokens, 4096) × min(vocab, 32768), one on CUDA, ~8.5 fp32
at once on CPU (measured), plus the hidden states' copy and fp32 gradient. FLOPs per token: 4·N (forward
+ input gradients of frozen linears) + 6·Σ r·(in + out) + 12·layers·h·s (attention, PaLM's), at an MFU."""

from __future__ import annotations

import bisect
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.adapters import build_peft_config
from pipeline.models import resolve_package_dir

if TYPE_CHECKING:
    from pipeline.config import ModelConfig, PipelineConfig

GIB = 2**30
RESULTS_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
DEFAULT_MFU = 0.35
# Dense peak TFLOP/s, (bf16/fp16, fp32 without TF32), NVIDIA datasheets (SXM); unknown GPUs count as H100.
PEAK_TFLOPS = {"h200": (989.0, 66.9), "h100": (989.0, 66.9), "a100": (312.0, 19.5)}
RUNTIME_GIB = {"cuda": 1.0, "cpu": 0.6}  # CUDA context and workspaces; CPU: RSS after imports (measured)
FRAGMENTATION = 0.10  # allocator slack on top of everything else
CPU_LOGIT_TILES = 8.5  # fp32 tiles alive at once in TRL's CPU fallback (measured 8.34-8.48)
TOKEN_TILE, VOCAB_TILE = 4096, 32768  # trl.kernels.chunked_logprob / trl.trainer.utils (pinned by a test)
SHARED_INPUT = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "gate_proj": "mlp", "up_proj": "mlp"}
MFU_HEADER = ("method", "r", "base", "seq len", "batch", "tokens/s", "MFU %", "peak GPU GiB")


class PlanError(Exception):
    """Input the plan cannot work with: one line for the user, exit 2."""


def model_config(model: ModelConfig, override: str | None = None) -> Any:
    """The transformers config, offline: --model-config, the local folder, a GGUF header or the HF cache."""
    from transformers import AutoConfig
    location = override or resolve_package_dir(model.name_or_path)
    file = Path(location) / "config.json" if Path(location).is_dir() else Path(location)
    if override and not file.is_file():
        raise PlanError(f"--model-config: {override} does not exist")
    gguf = {} if override or not model.gguf_file else {"gguf_file": model.gguf_file}
    try:
        return AutoConfig.from_pretrained(location, revision=model.revision, local_files_only=True,
                                          trust_remote_code=model.trust_remote_code, **gguf)  # fmt: skip
    except (OSError, ValueError, KeyError) as error:
        if not Path(location).exists():
            raise PlanError(f"model.name_or_path: no config.json for {location!r} offline (not a local "
                            "folder, not in the Hugging Face cache); pass --model-config "
                            "path/to/config.json") from None
        file = Path(location) / gguf["gguf_file"] if gguf else file
        raise PlanError(f"{file}: not a usable model config ({str(error).splitlines()[0]})") from None


def peft_on_meta(build: Any, peft_config: Any) -> Any:
    """``get_peft_model(build(), peft_config)`` on the meta device: shapes and exact counts, no memory."""
    import torch
    from peft import get_peft_model

    import uora  # noqa: F401  (registers UORA with PEFT)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecations, met inside PEFT
        return get_peft_model(build(), peft_config)


def state_bytes(stage: int, world: int, mixed: bool, deepspeed: bool) -> float:
    """Bytes per trainable parameter (weight, gradient, AdamW) per GPU. Without DeepSpeed PEFT keeps adapters
    fp32: 4 + 4 + 8. DeepSpeed, bf16/fp16: a 16-bit weight + the 18 bytes its estimator itemises (16-bit and
    fp32 gradient, fp32 master, two moments); fp32: 4 + 12. ZeRO-1 shards the optimizer, 2 grads, 3 all."""
    if not deepspeed:
        return 16.0
    weight, rest, grads = (2, 18, 6) if mixed else (4, 12, 4)
    return {0: weight + rest, 1: weight + grads + (rest - grads) / world,
            2: weight + rest / world}.get(stage, (weight + rest) / world)  # fmt: skip


def analyse(config: PipelineConfig, hf_config: Any) -> dict[str, Any]:
    """Everything the plan needs from the model, counted once on the meta device."""
    from torch import nn
    from transformers import AutoModelForCausalLM
    trust = config.model.trust_remote_code
    model = peft_on_meta(lambda: AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust),
                         build_peft_config(config.adapter))  # fmt: skip
    trainable, total = model.get_nb_trainable_parameters()
    text, lm_head = hf_config.get_text_config(), model.get_output_embeddings()
    eight_bit = config.model.load_in_8bit
    wide = 4 if eight_bit or config.model.dtype == "float32" else 2  # bytes of a parameter not int8
    weights = matmul = largest = 0
    adapted: list[tuple[str, int, int]] = []  # (name, in, out) of each adapted linear layer
    seen = set()  # tied parameters count once
    for name, module in model.named_modules():
        if hasattr(module, "base_layer") and isinstance(module.base_layer, nn.Linear):
            adapted.append((name, module.base_layer.in_features, module.base_layer.out_features))
        own = [p for p in module.parameters(recurse=False) if not p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in own)
        largest = max(largest, sum(p.numel() for p in own))
        int8 = eight_bit and isinstance(module, nn.Linear) and module is not lm_head
        for param in own:  # int8 weights carry bitsandbytes' fp32 scale per output row; the rest of an
            n = param.numel()  # 8-bit base is upcast to fp32 (prepare_model_for_kbit_training)
            weights += n + 4 * module.out_features if int8 and param is module.weight else n * wide
        if isinstance(module, nn.Linear) and not module.weight.requires_grad:  # a tied lm_head too
            matmul += module.weight.numel()
    return {"total": total, "trainable": trainable, "frozen_bytes": weights, "largest_layer": largest,
            "buffer_bytes": sum(b.numel() for b in model.buffers()) * 4,  # UORA/VeRA's projections: fp32
            "matmul_params": matmul, "adapted": adapted,
            "adapter_matrices": sum(config.adapter.r * (fan_in + fan_out) for _, fan_in, fan_out in adapted),
            "layers": text.num_hidden_layers, "hidden": text.hidden_size, "heads": text.num_attention_heads,
            "intermediate": getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
            "vocab": text.vocab_size}  # fmt: skip


def activation_bytes(config: PipelineConfig, shape: dict[str, Any], checkpointing: bool) -> float:
    """Bytes autograd keeps per token of a micro-batch (see the module docstring for the formula)."""
    (s, mixed, e), adapter = precision(config), config.adapter
    h, i, layers, a = shape["hidden"], shape["intermediate"], shape["layers"], 2 if mixed else 4
    layer = 2 * (4 * h + 4) + 4 * e * h + 4 * shape["heads"] + e * s + 3 * e * i
    dropout = getattr(adapter, f"{adapter.method}_dropout")
    shared = dropout == 0 and e == a == 4  # no cast, no dropout: modules read the same tensor
    weight = 2 if mixed and config.train.deepspeed else 4  # adapter weights: fp32 but under DeepSpeed
    inputs, adapters = set(), 0.0  # inputs: (parent module, shared input) already counted
    for name, fan_in, fan_out in shape["adapted"]:
        parent, _, leaf = name.rpartition(".")
        if adapter.method == "lora":
            adapters += a * adapter.r
            if dropout:
                adapters += (a + weight) * fan_in  # the dropped input; the mask, in the adapter's dtype
            elif not shared or (leaf != "o_proj" and (parent, SHARED_INPUT.get(leaf, leaf)) not in inputs):
                adapters += a * fan_in  # o_proj's shared input is SDPA's output, counted above
                inputs.add((parent, SHARED_INPUT.get(leaf, leaf)))
        else:
            adapters += a * (adapter.r + fan_out) + (e * fan_in if dropout else 0)
    if checkpointing:  # each layer keeps its input; the backward recomputes one layer at a time
        return layers * e * h + layer + adapters / max(layers, 1) + 4 * h + 4  # + the final RMSNorm
    return layers * layer + adapters + 4 * h + 4


def precision(config: PipelineConfig) -> tuple[int, bool, int]:
    """The longest sequence (train.max_length truncates, data.max_length drops longer rows), whether bf16/fp16
    is on, bytes per activation: 16-bit under bf16/fp16 or a 16-bit base (an 8-bit one runs in fp32)."""
    mixed = config.train.bf16 or config.train.fp16
    e = 2 if mixed or not (config.model.load_in_8bit or config.model.dtype == "float32") else 4
    return min(config.train.max_length, config.data.max_length), mixed, e


def memory(config: PipelineConfig, shape: dict[str, Any], world: int, batch: int, device: str = "cuda",
           checkpointing: bool | None = None) -> dict[str, float]:  # fmt: skip
    """Per-GPU memory in GiB for one per-device batch size."""
    (s, mixed, e), train, weights = precision(config), config.train, shape["frozen_bytes"]
    if train.zero_stage == 3:  # partitioned, plus the gathered layer and the prefetched one in 16 bits
        weights = weights / world + 4 * shape["largest_layer"]
    states = shape["trainable"] * state_bytes(train.zero_stage, world, mixed, bool(train.deepspeed))
    gc = train.activation_checkpointing if checkpointing is None else checkpointing
    activations = batch * s * activation_bytes(config, shape, gc)
    if mixed and not train.deepspeed:  # autocast saves a 16-bit copy of each adapter matrix it uses
        activations += 2 * shape["adapter_matrices"] / (shape["layers"] if gc else 1)
    tokens = batch * (s - 1)  # the LM head's logits, in tiles, and the hidden states
    tile = min(tokens, TOKEN_TILE) * min(shape["vocab"], VOCAB_TILE)
    logits = CPU_LOGIT_TILES * tile * 4 if device == "cpu" else tile * e
    logits += tokens * shape["hidden"] * (4 + e)
    parts = {"weights_gb": weights + shape["buffer_bytes"], "adapter_states_gb": states,
             "activations_gb": activations, "logits_gb": logits}  # fmt: skip
    parts["overhead_gb"] = RUNTIME_GIB[device] * GIB + FRAGMENTATION * sum(parts.values())
    parts["total_gb"] = sum(parts.values())
    return {key: value / GIB for key, value in parts.items()}


def mfu_from_results(method: str, base: str, r: int, results: Path | None = None) -> tuple[float, str] | None:
    """MFU from ``benchmarks/results/gpu_*.md`` rows of this method and base dtype (same rank preferred)."""
    found = []
    for path in sorted((results or RESULTS_DIR).glob("gpu_*.md")):
        header: list[str] | None = None
        for line in path.read_text(encoding="utf-8").splitlines():
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            is_header = set(MFU_HEADER) <= set(cells)
            if is_header or not line.lstrip().startswith("|"):  # a table starts or ends
                header = cells if is_header else None
            elif header and len(cells) == len(header) and not set(line) <= set("|-: "):
                row = dict(zip(header, cells, strict=True))
                mfu, ours = row["MFU %"], (row["method"].lower(), row["base"].lower()) == (method, base)
                if ours and mfu.replace(".", "").isdigit():  # not a failed cell ("—")
                    found.append((row["r"] != str(r), float(mfu) / 100, f"{path.name}: {line.strip()}"))
    return min(found, key=lambda item: item[0])[1:] if found else None


def train_tokens(config: PipelineConfig, world: int) -> tuple[float | None, str]:
    """Tokens the configured steps or epochs process, and where the number comes from."""
    train, data, s = config.train, config.data, precision(config)[0]
    stats_path = config.run_dir / "prepare" / "stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else None
    per_row = min(stats["token_length"]["mean"], s) if stats else s
    where = (f"mean row {per_row:.0f} tokens ({stats_path})" if stats
             else f"{s} tokens per row (no prepare stats)")  # fmt: skip
    if train.max_steps > 0:
        rows = train.max_steps * train.gradient_accumulation_steps * train.per_device_train_batch_size * world
        return rows * per_row, f"{train.max_steps} steps × {rows // train.max_steps} rows, {where}"
    counts = [source.samples or source.builtin for source in data.sources]
    if stats:
        rows = stats["rows_out"]["train"]
    elif all(counts) and data.eval_size is None:  # every source says how many rows it gives
        rows, where = round(sum(counts) * (1 - data.eval_fraction)), f"rows from data.sources, {where}"
    else:
        return None, "unknown: epochs need the row count (run `python -m pipeline prepare CONFIG` first)"
    epochs = train.num_train_epochs
    return rows * epochs * per_row, f"{epochs:g} epoch(s) × {rows} rows, {where}"


def plan(config: PipelineConfig, *, nodes: int = 1, gpus_per_node: int = 1, gpu_memory: float | None = None,
         model_config_path: str | None = None, device: str = "cuda") -> dict[str, Any]:  # fmt: skip
    """The plan as a JSON-ready dict; raises PlanError for input it cannot work with."""
    if nodes < 1 or gpus_per_node < 1:
        raise PlanError(f"--nodes {nodes} --gpus-per-node {gpus_per_node}: the plan sizes GPU memory; "
                        "give at least one node and one GPU per node (CPU allocations are not planned)")
    if "max_length" not in config.train.model_fields_set:
        raise PlanError("train.max_length: not set in the config; the plan sizes activations by it (set it)")
    import torch
    gpu = device == "cuda" and torch.cuda.is_available()
    gpu_name = torch.cuda.get_device_name(0) if gpu else ""
    capacity = gpu_memory or torch.cuda.get_device_properties(0).total_memory / GIB if gpu else gpu_memory
    if capacity is None:
        raise PlanError("no GPU here to read its memory size from: pass --gpu-memory GiB (an H100 80GB: 79)")
    world, train, (s, mixed, e) = nodes * gpus_per_node, config.train, precision(config)
    shape = analyse(config, model_config(config.model, model_config_path))
    batch = train.per_device_train_batch_size
    per_gpu = {**memory(config, shape, world, batch, device), "capacity_gb": capacity}
    other = {gc: memory(config, shape, world, batch, device, gc)["activations_gb"] for gc in (True, False)}
    measured = mfu_from_results(config.adapter.method, "int8" if config.model.load_in_8bit else "bf16",
                                config.adapter.r)  # fmt: skip
    mfu, mfu_source = measured or (DEFAULT_MFU, "assumed (no matching row in benchmarks/results/gpu_*.md)")
    measured_on = mfu_source.split(":")[0]  # the results file's name, e.g. gpu_nvidia_h200.md
    key = next((k for name in (gpu_name, measured_on) for k in PEAK_TFLOPS if k in name.lower()), "h100")
    peak = PEAK_TFLOPS[key][0 if e == 2 else 1] * 1e12
    flops = 4 * shape["matmul_params"] + 6 * shape["adapter_matrices"]
    flops += 12 * shape["layers"] * shape["hidden"] * s
    tokens_per_s, (tokens, tokens_source) = world * mfu * peak / flops, train_tokens(config, world)
    per_param = state_bytes(train.zero_stage, world, mixed, bool(train.deepspeed))
    assumptions = {
        "units": "GiB (2^30 bytes), per GPU, all parts live at once", "world_size": world,
        "sequence_length": s, "zero_stage": train.zero_stage,
        "activations_gb_by_checkpointing": {"on": round(other[True], 3), "off": round(other[False], 3)},
        "adapter_states": f"{per_param:.2f} bytes per trainable parameter (weight, gradient, AdamW)",
        "overhead": f"{RUNTIME_GIB[device]} GiB runtime ({device}) + {FRAGMENTATION:.0%} allocator slack",
        "mfu": mfu, "mfu_source": mfu_source,
        "peak_flops": f"{peak / 1e12:g} TFLOP/s ({key.upper()}, {'detected' if gpu_name else 'assumed'})",
        "flops_per_token": flops, "tokens": tokens_source}  # fmt: skip
    largest = bisect.bisect_left(range(1, 1 << 20), True,  # the largest batch that fits (0: not even one)
                                 key=lambda b: memory(config, shape, world, b, device)["total_gb"] > capacity)
    return {"total_params": shape["total"], "trainable_params": shape["trainable"], "per_gpu": per_gpu,
            "fits": per_gpu["total_gb"] <= capacity, "max_per_device_batch": largest,
            "tokens_per_second_estimate": tokens_per_s,
            "hours_estimate": tokens / tokens_per_s / 3600 if tokens is not None else None,
            "assumptions": assumptions}  # fmt: skip
