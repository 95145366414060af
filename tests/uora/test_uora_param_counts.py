"""Trainable-parameter counts reproduce the published table (models built on the meta device)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, VeraConfig, get_peft_model
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaModel,
)

from uora import UoraConfig

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _roberta(large: bool):
    if large:
        return RobertaConfig(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
        )
    return RobertaConfig()  # roberta-base shapes


def _llama(size: str):
    if size == "7b":
        return LlamaConfig(
            hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
        )
    return LlamaConfig(
        hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40
    )


BUILDERS = {
    "roberta-base": lambda: RobertaModel(_roberta(False), add_pooling_layer=False),
    "roberta-large": lambda: RobertaModel(_roberta(True), add_pooling_layer=False),
    "gpt2-medium": lambda: GPT2LMHeadModel(GPT2Config(n_embd=1024, n_layer=24, n_head=16)),
    "llama-2-7b": lambda: LlamaForCausalLM(_llama("7b")),
    "llama-2-13b": lambda: LlamaForCausalLM(_llama("13b")),
}


def _trainable(model_name: str, config) -> int:
    with torch.device("meta"):  # shapes only: no weights are allocated, adapters included
        model = get_peft_model(BUILDERS[model_name](), config)
    return model.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize(
    ("model_name", "targets", "r", "expected"),
    [
        ("roberta-base", ["query", "value"], 1024, 43_008),
        ("roberta-large", ["query", "value"], 256, 61_440),
        ("gpt2-medium", ["c_attn"], 1024, 98_304),
        ("llama-2-7b", LLAMA_LINEAR, 1024, 1_589_248),
        ("llama-2-7b", LLAMA_LINEAR, 256, 1_417_216),
        ("llama-2-13b", LLAMA_LINEAR, 1024, 2_416_640),
    ],
)
def test_uora_and_vera_counts_match_the_table(model_name, targets, r, expected):
    assert _trainable(model_name, UoraConfig(r=r, target_modules=targets)) == expected
    assert _trainable(model_name, VeraConfig(r=r, target_modules=targets)) == expected


def test_all_linear_on_llama_excludes_lm_head_and_matches():
    assert _trainable("llama-2-7b", UoraConfig(r=1024, target_modules="all-linear")) == 1_589_248


@pytest.mark.parametrize(
    ("model_name", "expected"), [("llama-2-7b", 159_907_840), ("llama-2-13b", 250_347_520)]
)
def test_lora_r64_counts_match_the_table(model_name, expected):
    assert _trainable(model_name, LoraConfig(r=64, target_modules=LLAMA_LINEAR)) == expected
