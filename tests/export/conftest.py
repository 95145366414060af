"""Fixtures for the export and promote tests: the training tokenizer and a tiny base folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from export_helpers import TEMPLATE_MARKER

EXPERIMENT = "export-tests"


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.chat_template = tokenizer.chat_template + TEMPLATE_MARKER
    return tokenizer


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A tiny random Llama with SmolLM2's vocabulary, saved as an HF folder with its tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,  # large enough that logits (and adapter effects) are not ~0
    )
    folder = tmp_path_factory.mktemp("tiny_base")
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite tracking + registry store for the session (creating one costs seconds), with
    an experiment whose artifacts live beside it. Tests isolate themselves by registered-model
    name and by their own runs."""
    import mlflow

    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.MlflowClient().create_experiment(EXPERIMENT, artifact_location=(folder / "artifacts").as_uri())
    finally:
        mlflow.set_tracking_uri(None)
    return uri


@pytest.fixture
def mlflow_tracking(mlflow_store: str):
    """Point MLflow at the session store and its experiment for one test, then restore."""
    import mlflow

    mlflow.set_tracking_uri(mlflow_store)
    mlflow.set_experiment(EXPERIMENT)
    yield mlflow_store
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
