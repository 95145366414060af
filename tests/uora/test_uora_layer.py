"""The adapted layer: ΔW = 0 at init, the forward formula, merge/unmerge, PEFT's model API."""

from __future__ import annotations

import copy
import io
from contextlib import redirect_stdout

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from uora_helpers import randomise_vectors

import uora
from uora import UoraConfig

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft(tiny_llama, r=8, seed=0, **kwargs):
    base = tiny_llama(seed=seed)
    reference = copy.deepcopy(base)
    model = get_peft_model(base, UoraConfig(r=r, target_modules="all-linear", **kwargs))
    return model, reference


def test_delta_w_is_zero_at_init(tiny_llama, ids):
    model, reference = _peft(tiny_llama)
    assert torch.equal(model(ids).logits, reference(ids).logits)


def test_forward_equals_the_formula_computed_independently(tiny_llama):
    model, reference = _peft(tiny_llama, r=8)
    randomise_vectors(model)
    layer = model.base_model.model.model.layers[1].mlp.down_proj  # in=64, out=32: uses slices of A and B
    base = reference.model.layers[1].mlp.down_proj
    a = model.base_model.uora_A["default"].double()
    b_proj = model.base_model.uora_B["default"].double()
    d = layer.uora_lambda_d["default"].detach().double()
    b = layer.uora_lambda_b["default"].detach().double()
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))
    xd = x.double()
    # h = W0 x + b ⊙ (B[:out] (d ⊙ (A[:, :in] x)))
    expected = xd @ base.weight.double().T + b * ((d * (xd @ a[:, :64].T)) @ b_proj[:32, :].T)
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_model_output_equals_an_independently_merged_base(tiny_llama, ids):
    model, reference = _peft(tiny_llama, r=8)
    randomise_vectors(model)
    a = model.base_model.uora_A["default"].double()
    b_proj = model.base_model.uora_B["default"].double()
    with torch.no_grad():
        for name, module in model.base_model.model.named_modules():
            if isinstance(module, uora.UoraLayer):
                target = reference.get_submodule(name)
                out_f, in_f = target.weight.shape
                d = module.uora_lambda_d["default"].double()
                b = module.uora_lambda_b["default"].double()
                delta = torch.diag(b) @ b_proj[:out_f] @ torch.diag(d) @ a[:, :in_f]
                target.weight.copy_((target.weight.double() + delta).float())
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)


def test_init_weights_false_starts_like_veras_test_init(tiny_llama, ids):
    """`init_weights=False` is VeRA's: b = 1 and d ~ N(0, 1) from torch's global generator, so ΔW ≠ 0."""
    from peft import VeraConfig

    model, reference = _peft(tiny_llama, init_weights=False)
    vera_config = VeraConfig(r=8, target_modules="all-linear", init_weights=False)
    vera = get_peft_model(tiny_llama(seed=0), vera_config)
    layers = model.base_model.uora_layers("default")
    vera_layers = [m for m in vera.modules() if hasattr(m, "vera_lambda_d") and "default" in m.vera_lambda_d]
    assert len(layers) == len(vera_layers) == 14
    for layer, twin in zip(layers, vera_layers, strict=True):
        assert torch.equal(layer.uora_lambda_b["default"], torch.ones(layer.out_features))
        assert torch.equal(layer.uora_lambda_d["default"], twin.vera_lambda_d["default"])
    d = torch.cat([layer.uora_lambda_d["default"] for layer in layers])
    assert 0.5 < float(d.std()) < 1.5 and len(set(d.tolist())) == d.numel()
    assert not torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-3)


def test_merge_matches_unmerged_and_unmerge_restores_base(tiny_llama, ids):
    model, reference = _peft(tiny_llama)
    randomise_vectors(model)
    with torch.no_grad():
        unmerged = model(ids).logits
        model.base_model.merge_adapter()
        torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=0)
        model.base_model.unmerge_adapter()
        torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=0)
        with model.disable_adapter():
            torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, uora.UoraLayer):
            torch.testing.assert_close(
                module.get_base_layer().weight, reference.get_submodule(name).weight, atol=1e-6, rtol=0
            )


def test_merge_and_unload_gives_a_plain_model_with_the_same_outputs(tiny_llama, ids):
    model, _ = _peft(tiny_llama)
    randomise_vectors(model)
    with torch.no_grad():
        expected = model(ids).logits
        merged = model.merge_and_unload()
        assert not any(isinstance(m, uora.UoraLayer) for m in merged.modules())
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=0)


def test_disable_adapter_gives_base_outputs(tiny_llama, ids):
    model, reference = _peft(tiny_llama)
    randomise_vectors(model)
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert not torch.equal(model(ids).logits, reference(ids).logits)


def test_print_trainable_parameters_counts_out_plus_r(tiny_llama):
    model, _ = _peft(tiny_llama, r=8)
    # per decoder layer: q,o (32), k,v (16), gate,up (64), down (32) outputs; 2 layers; + r per layer
    expected = 2 * (32 + 16 + 16 + 32 + 64 + 64 + 32) + 2 * 7 * 8
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        model.print_trainable_parameters()
    assert f"trainable params: {expected:,}" in buffer.getvalue()
    assert model.get_nb_trainable_parameters()[0] == expected


def test_two_adapters_keep_their_own_projections(tiny_llama, ids):
    model, _ = _peft(tiny_llama, r=8)
    first_a = model.base_model.uora_A["default"].clone()
    model.add_adapter("second", UoraConfig(r=4, target_modules=["q_proj"], projection_prng_key=9))
    tuner = model.base_model
    assert torch.equal(tuner.uora_A["default"], first_a)
    assert tuner.uora_A["second"].shape == (4, 32) and tuner.uora_B["second"].shape == (32, 4)
    assert not torch.allclose(tuner.uora_A["second"], first_a[:4, :32])
    assert tuner.uora_reinit_counts["second"].shape == (2, 4)
    model.set_adapter("second")
    randomise_vectors(model, adapter="second")
    out_second = model(ids).logits
    model.delete_adapter("second")
    for attr in ("uora_A", "uora_B", "uora_reinit_counts", "uora_reinit_draws"):
        assert "second" not in getattr(tuner, attr)
    assert torch.equal(tuner.uora_A["default"], first_a)
    assert model.active_adapters == ["default"]
    assert not torch.equal(model(ids).logits, out_second)


def test_save_and_load_reproduces_outputs_exactly(tiny_llama, ids, tmp_path):
    model, _ = _peft(tiny_llama, r=8, projection_prng_key=4)
    randomise_vectors(model)
    # projections no longer equal to what the seed would regenerate (as after re-initialisation)
    with torch.no_grad():
        model.base_model.uora_A["default"][3].mul_(-0.5)
        model.base_model.uora_B["default"][:, 5].add_(0.25)
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path)
    assert isinstance(loaded.peft_config["default"], UoraConfig)
    assert torch.equal(loaded(ids).logits, expected)
    assert torch.equal(loaded.base_model.uora_A["default"], model.base_model.uora_A["default"])


def test_auto_peft_model_loads_a_uora_adapter(tiny_llama, ids, tmp_path):
    base_dir = tmp_path / "base"
    tiny_llama(seed=0).save_pretrained(base_dir)
    model = get_peft_model(tiny_llama(seed=0), UoraConfig(r=8, target_modules=TARGETS))
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    randomise_vectors(model)
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_loading_a_checkpoint_without_projections_is_refused(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    model = get_peft_model(tiny_llama(), UoraConfig(r=8, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if "uora_A" not in k}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="The UORA checkpoint has no 'uora_A' projection"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_half_precision_base_keeps_fp32_projections_with_fp32_vectors(tiny_llama, ids):
    base = tiny_llama().to(torch.bfloat16)
    model = get_peft_model(base, UoraConfig(r=8, target_modules="all-linear"))  # autocasts d, b to fp32
    tuner = model.base_model
    layer = tuner.model.model.layers[0].self_attn.q_proj
    assert layer.uora_lambda_d["default"].dtype == torch.float32
    assert tuner.uora_A["default"].dtype == torch.float32
    a = tuner.uora_A["default"]
    torch.testing.assert_close(a @ a.T, torch.eye(8), atol=1e-5, rtol=0)
    assert model(ids).logits.dtype == torch.bfloat16


def test_low_cpu_mem_loading_and_loading_under_a_second_name(tiny_llama, ids, tmp_path):
    model, _ = _peft(tiny_llama)
    randomise_vectors(model)
    with torch.no_grad():
        model.base_model.uora_A["default"][0].mul_(2.0)  # not what the seed regenerates
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    lazy = PeftModel.from_pretrained(tiny_llama(), tmp_path, low_cpu_mem_usage=True)
    assert torch.equal(lazy(ids).logits, expected)
    both = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    both.load_adapter(tmp_path, "second")
    assert torch.equal(both.base_model.uora_A["second"], model.base_model.uora_A["default"])
    both.set_adapter("second")
    assert torch.equal(both(ids).logits, expected)
