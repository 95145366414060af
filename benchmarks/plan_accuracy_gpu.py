"""GPU half of the plan's accuracy check; needs only torch, transformers, PEFT and TRL's kernel file.

    python benchmarks/plan_accuracy_gpu.py OUT.json TRL_KERNELS_DIR   # then: plan_accuracy.py --gpu OUT.json

Random bf16 weights of the Llama-2 shapes (no download) and the step the pipeline's trainer takes
on one GPU without DeepSpeed: bf16 autocast, fp32 adapters (PEFT), non-reentrant checkpointing,
TRL's fused LM head (chunked_logprob), fused AdamW, a padded batch. Per setting: peak CUDA memory
allocated (model included) and reserved over 3 steps, the CUDA context (used - reserved), tokens/s;
per method, the memory one more decoder layer's forward keeps for backward (1024 tokens, autocast).
Kept small on purpose: it travels to a GPU host minified inside a 2,000-character command.
"""

import importlib.util
import json
import sys
import time
import types
from contextlib import nullcontext

import torch

sys.path.insert(0, ".")
sys.modules["trl.trainer.utils"] = types.SimpleNamespace(maybe_gather_lm_head_ctx=lambda *_: nullcontext())
spec = importlib.util.spec_from_file_location("trl.kernels.c", sys.argv[2] + "/chunked_logprob.py")
kernel = importlib.util.module_from_spec(spec)  # TRL is not installed there: its kernel file, its one
spec.loader.exec_module(kernel)  # import from TRL (FSDP's gather, a no-op here) stubbed above
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from uora import UoraConfig  # noqa: E402

cuda = torch.cuda
SHAPES = {7: (4096, 11008, 32), 13: (5120, 13824, 40)}  # Llama-2: hidden, intermediate, layers


def build(size, method, layers=0):
    hidden, inter, depth = SHAPES[size]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers or depth,
                         num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128)  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    targets = {"r": 64, "target_modules": "all-linear"}
    adapter = LoraConfig(**targets, lora_alpha=128, lora_dropout=0.05) if method == "lora" else None
    adapter = adapter or UoraConfig(**targets, uora_dropout=0.05)
    return get_peft_model(
        model, adapter
    )  # in training mode; PEFT upcasts the adapter to fp32, as in training


def loss(model, rows):
    """Decoder + TRL's fused head over a padded batch of 1024-token rows, under autocast."""
    ids = torch.randint(0, 32000, (rows, 1024), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, 512:] = 0
    base = model.get_base_model()
    with torch.autocast("cuda", torch.bfloat16):
        hidden = base.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        valid = mask[:, 1:] > 0
        outputs = ("log_probs", "entropy", "is_top1")
        head = kernel.ChunkedLogProbFunction.apply
        return -head(hidden[valid], base.lm_head.weight, None, ids[:, 1:][valid], 1, 32768, None, 1, outputs)[
            0
        ].sum()


report = {"saved": {}, "runs": []}
for method in ("uora", "lora"):  # what one more layer keeps for backward
    grew = []
    for layers in (2, 3):
        model = build(7, method, layers)
        before = cuda.memory_allocated()
        kept = loss(model, 1)
        grew.append(cuda.memory_allocated() - before)
        del kept, model
    report["saved"][method] = (grew[1] - grew[0]) / 1024
for size, method, rows, checkpointing in [(7, "uora", 4, 1), (7, "uora", 16, 1), (7, "lora", 4, 1),
                                          (7, "uora", 2, 0), (13, "uora", 4, 1)]:  # fmt: skip
    run = {"size": size, "method": method, "batch": rows, "checkpointing": checkpointing}
    try:
        cuda.empty_cache()
        cuda.reset_peak_memory_stats()
        before = cuda.memory_allocated()
        model = build(size, method)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], fused=True)
        for _ in range(3):  # the last step is timed
            began = time.perf_counter()
            loss(model, rows).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            cuda.synchronize()
        free, total = cuda.mem_get_info()
        seconds = time.perf_counter() - began
        run.update(peak=cuda.max_memory_allocated() - before, reserved=cuda.max_memory_reserved(),
                   context=total - free - cuda.memory_reserved(), tokens_s=rows * 1024 / seconds)  # fmt: skip
        del model, optimizer
    except Exception as error:  # one failed setting must not lose the others
        run["error"] = repr(error)[:300]
    report["runs"].append(run)
    print(run, flush=True)
with open(sys.argv[1], "w") as out:
    json.dump(report, out)
