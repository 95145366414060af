"""UORA on GPT-2 (Conv1D), RoBERTa sequence classification, and an 8-bit bitsandbytes base."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    GPT2Config,
    GPT2LMHeadModel,
    RobertaConfig,
    RobertaForSequenceClassification,
)
from transformers.pytorch_utils import Conv1D
from uora_helpers import adapter_state, randomise_vectors

import uora
from uora import UoraConfig


def _gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return GPT2LMHeadModel(cfg).eval()


def test_gpt2_conv1d_forward_merge_and_formula(ids):
    base = _gpt2()
    reference = copy.deepcopy(base)
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to True"):
        model = get_peft_model(base, UoraConfig(r=8, target_modules=["c_attn", "c_proj"]))
    assert torch.equal(model(ids).logits, reference(ids).logits)
    randomise_vectors(model)
    layer = model.base_model.model.transformer.h[0].attn.c_attn  # Conv1D: weight is (in=32, out=96)
    assert isinstance(layer.get_base_layer(), Conv1D) and layer.fan_in_fan_out
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(0))
    a = model.base_model.uora_A["default"][:, :32]
    b_proj = model.base_model.uora_B["default"][:96]
    d, b = layer.uora_lambda_d["default"], layer.uora_lambda_b["default"]
    base_layer = reference.transformer.h[0].attn.c_attn
    expected = base_layer(x) + b * ((d * (x @ a.T)) @ b_proj.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        unmerged = model(ids).logits
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, unmerged, atol=1e-5, rtol=0)


def test_roberta_sequence_classification_with_modules_to_save(tmp_path):
    cfg = RobertaConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = get_peft_model(
        RobertaForSequenceClassification(cfg).eval(),
        UoraConfig(
            r=8, task_type="SEQ_CLS", target_modules=["query", "value"], modules_to_save=["classifier"]
        ),
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier.modules_to_save" in n for n in trainable)
    assert all("uora_lambda" in n or "classifier.modules_to_save" in n for n in trainable)
    ids = torch.randint(3, 128, (4, 10), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 1])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        uora.reinit_step(model)
    model.eval()
    expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(RobertaForSequenceClassification(cfg).eval(), tmp_path)
    assert torch.equal(loaded(input_ids=ids).logits, expected)


@pytest.fixture
def int8_llama(tiny_llama, tmp_path):
    pytest.importorskip("bitsandbytes")
    tiny_llama(seed=0).save_pretrained(tmp_path / "base")
    return AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
    )


def test_8bit_base_forward_backward_step_and_reinit(int8_llama, ids):
    import bitsandbytes as bnb

    cfg = UoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"], reinit_threshold=0.05)
    model = get_peft_model(int8_llama, cfg)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.get_base_layer(), bnb.nn.Linear8bitLt)
    with torch.no_grad():
        baseline = model(ids).logits
        with model.disable_adapter():
            assert torch.equal(model(ids).logits, baseline)  # ΔW = 0 at init on the int8 base too
        model.base_model.uora_layers("default")[0].uora_lambda_d["default"][2] = 0.0
    before = adapter_state(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert (
        layer.uora_lambda_b["default"].grad is not None
        and layer.uora_lambda_b["default"].grad.abs().sum() > 0
    )
    opt.step()
    assert uora.reinit_step(model) == 1
    after = adapter_state(model)
    assert not torch.equal(before["base_model.uora_A"], after["base_model.uora_A"])
    assert not torch.equal(
        before["base_model.model.model.layers.0.self_attn.q_proj.uora_lambda_b"],
        after["base_model.model.model.layers.0.self_attn.q_proj.uora_lambda_b"],
    )
    model.eval()
    with torch.no_grad():
        adapted = model(ids).logits
        assert torch.isfinite(adapted).all() and not torch.equal(adapted, baseline)
        # merging into int8 weights re-quantises them: equal up to int8 rounding, not to 1e-5
        model.base_model.merge_adapter()
        torch.testing.assert_close(model(ids).logits, adapted, atol=2e-2, rtol=0)
        model.base_model.unmerge_adapter()
        torch.testing.assert_close(model(ids).logits, adapted, atol=2e-2, rtol=0)


def test_8bit_base_with_bf16_trainable_vectors(int8_llama, ids):
    """TRL casts trainable parameters of quantised models to bf16: A/B stay float32, the layers
    compute with one shared bf16 copy of them."""
    model = get_peft_model(int8_llama, UoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    tuner = model.base_model
    masters = {attr: getattr(tuner, attr)["default"].clone() for attr in ("uora_A", "uora_B")}
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for attr, before in masters.items():
        after = getattr(tuner, attr)["default"]
        assert after.dtype == torch.float32 and torch.equal(after, before), attr
    layer = tuner.model.model.layers[0].self_attn.q_proj
    proj_a, proj_b = layer._projections("default", torch.bfloat16, ids.device)
    assert torch.equal(proj_a, masters["uora_A"][:, : layer.in_features].to(torch.bfloat16))
    assert torch.equal(proj_b, masters["uora_B"][: layer.out_features].to(torch.bfloat16))
    other = tuner.model.model.layers[1].self_attn.v_proj
    assert other._projections("default", torch.bfloat16, ids.device)[0].data_ptr() == proj_a.data_ptr()
    assert all(
        p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters() if p.requires_grad
    )
