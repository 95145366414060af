"""DeepSpeed ZeRO-2 on one GPU through the train stage (torchrun, configs/deepspeed/zero2.json, the
Trainer's own torch AdamW handed to DeepSpeed: no compiled DeepSpeed op is needed), saving a
complete UORA adapter. bf16 on CUDA; on the CPU (rehearsal) float32 over gloo."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
ZERO2 = str(REPO / "configs" / "deepspeed" / "zero2.json")
R = 16


@pytest.fixture(scope="module")
def zero2(device, gpu_model_dir, tmp_path_factory):
    from train_helpers import make_config, make_ctx, write_prepared

    from pipeline.stages import train

    run_dir = tmp_path_factory.mktemp("zero2") / "run"
    write_prepared(run_dir)
    bf16 = device.type == "cuda"
    train_section = {"max_steps": 3, "bf16": bf16, "deepspeed": ZERO2, "nproc_per_node": 1}
    config = make_config(
        run_dir,
        str(gpu_model_dir),
        model={"dtype": "bfloat16" if bf16 else "float32"},
        adapter={"method": "uora", "r": R, "target_modules": "all-linear"},
        train=train_section,
    )
    metrics = train.run(make_ctx(run_dir, config)).metrics
    return run_dir / "train.partial", metrics


def test_zero2_saves_a_complete_adapter_that_loads(device, gpu_model_dir, zero2):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import uora  # noqa: F401  (registers UORA with PEFT)

    work, metrics = zero2
    assert (work / "DONE").is_file() and metrics["global_step"] == 3
    if device.type == "cuda":
        assert metrics["peak_cuda_memory_mb_rank0"] > 0
    adapter = load_file(work / "adapter" / "adapter_model.safetensors")
    d = {k: t for k, t in adapter.items() if "uora_lambda_d" in k}
    b = {k: t for k, t in adapter.items() if "uora_lambda_b" in k}
    assert len(d) == len(b) == 4 * 7
    assert all(t.shape == (R,) for t in d.values()) and all(t.numel() > 0 for t in b.values())
    assert any(t.abs().max() > 0 for t in b.values()), "b starts at 0: the optimizer steps reached it"

    base = AutoModelForCausalLM.from_pretrained(gpu_model_dir, dtype=torch.float32).eval()
    ids = torch.arange(2, 34).unsqueeze(0)
    with torch.no_grad():
        before = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, str(work / "adapter")).eval()
        after = tuned(input_ids=ids).logits
    assert not torch.allclose(before, after), "the saved adapter does not change the model"


def test_zero2_keeps_projections_float32_on_disk(zero2):
    """DeepSpeed's bf16 engine casts the whole module, buffers included; the shared projections
    must still be saved in float32 (issue 13)."""
    from safetensors.torch import load_file

    work, _ = zero2
    adapter = load_file(work / "adapter" / "adapter_model.safetensors")
    projections = {k: t.dtype for k, t in adapter.items() if "uora_A" in k or "uora_B" in k}
    assert projections and set(projections.values()) == {torch.float32}, projections
