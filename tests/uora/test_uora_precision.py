"""A and B stay float32 masters under bf16: whole-model casts, bf16 vectors, loading, training with
re-initialisation, saving, merging, gradient checkpointing (torch's CPU bf16)."""

from __future__ import annotations

import copy

import torch
from peft import PeftModel, get_peft_model
from safetensors import safe_open

import uora
from uora import UoraConfig
from uora.init import derived_seed, init_projection_pair

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _model(tiny_llama, **kwargs):
    return get_peft_model(tiny_llama(), UoraConfig(r=8, target_modules=TARGETS, **kwargs))


def _masters(model) -> tuple[torch.Tensor, torch.Tensor]:
    tuner = model.base_model
    return tuner.uora_A["default"], tuner.uora_B["default"]


def test_whole_model_casts_move_but_never_round_the_projections(tiny_llama, ids):
    model = _model(tiny_llama, init_weights=False)
    a0, b0 = (t.clone() for t in _masters(model))
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.bfloat16()):
        cast(model)
        a, b = _masters(model)
        assert a.dtype == b.dtype == torch.float32
        assert torch.equal(a, a0) and torch.equal(b, b0)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.uora_lambda_d["default"].dtype == torch.bfloat16  # the cast did reach the vectors
    assert model(ids).logits.dtype == torch.bfloat16
    # a cast that also changes the device moves the masters there, still float32
    model.to(device="meta", dtype=torch.bfloat16)
    a, _ = _masters(model)
    assert a.device.type == "meta" and a.dtype == torch.float32


def test_bf16_layers_share_one_cached_copy_renewed_after_each_write(tiny_llama, ids):
    model = _model(tiny_llama, init_weights=False, reinit_threshold=10.0)
    model.to(torch.bfloat16)
    tuner = model.base_model
    q, v = (tuner.model.model.layers[0].self_attn.q_proj, tuner.model.model.layers[1].self_attn.v_proj)
    first = q._projections("default", torch.bfloat16, ids.device)[0]
    assert v._projections("default", torch.bfloat16, ids.device)[0].data_ptr() == first.data_ptr()
    model(ids)
    again = q._projections("default", torch.bfloat16, ids.device)[0]
    assert again.data_ptr() == first.data_ptr()  # cached, not remade (`first` keeps the old one alive)
    held = first.clone()
    assert uora.reinit_step(model) > 0  # every slot is below the threshold: A and B move
    renewed = q._projections("default", torch.bfloat16, ids.device)[0]
    a, _ = _masters(model)
    assert torch.equal(renewed, a[:, : q.in_features].to(torch.bfloat16))
    assert not torch.equal(renewed, held) and torch.equal(first, held)  # the old copy was never written


def test_loading_bf16_projections_stores_float32(tiny_llama, ids, tmp_path):
    from safetensors.torch import load_file, save_file

    model = _model(tiny_llama, init_weights=False)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    weights = load_file(path)
    save_file({k: v.to(torch.bfloat16) if "uora_" in k else v for k, v in weights.items()}, path)
    for low_cpu_mem_usage in (False, True):
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
        a, _ = _masters(loaded)
        assert a.dtype == torch.float32, low_cpu_mem_usage
        assert torch.equal(a, weights["base_model.uora_A"].to(torch.bfloat16).float())


def _reference_interpolation(a0, b0, alpha, events_per_step, steps, seed=0):
    """What float32 interpolation gives when every slot has ``events_per_step`` layer events per step."""
    target_a, target_b = init_projection_pair(a0.shape[0], a0.shape[1], b0.shape[0], derived_seed(seed, 0))
    keep = torch.tensor(alpha, dtype=torch.float64) ** events_per_step
    a, b = a0.double(), b0.double()
    for _ in range(steps):
        a = keep * a + (1 - keep) * target_a.double()
        b = keep * b + (1 - keep) * target_b.double()
    return a.float(), b.float()


def test_bf16_training_with_reinit_events_keeps_float32_projections(tiny_llama, ids, tmp_path):
    """The whole model cast to bf16 (as DeepSpeed's bf16 engine does), trained with an event on every
    slot of every layer at every step: A and B hold exactly the float32 interpolation, in memory and
    in the saved adapter; merged and unmerged outputs agree to bf16 precision."""
    alpha, steps = 0.9, 3
    model = _model(tiny_llama, reinit_threshold=10.0, reinit_alpha=alpha)  # |d| = 0.1 < 10: all dead
    a0, b0 = (t.clone() for t in _masters(model))
    model.to(torch.bfloat16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    layers = len(model.base_model.uora_layers("default"))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert uora.reinit_step(model) == layers * 8
    a, b = _masters(model)
    want_a, want_b = _reference_interpolation(a0, b0, alpha, layers, steps)
    assert a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(a, want_a, rtol=0, atol=1e-6)  # bf16 rounding would be ~1e-3
    torch.testing.assert_close(b, want_b, rtol=0, atol=1e-6)

    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as saved:
        for key, master in (("base_model.uora_A", a), ("base_model.uora_B", b)):
            tensor = saved.get_tensor(key)
            assert tensor.dtype == torch.float32 and torch.equal(tensor, master), key

    model.eval()
    with torch.no_grad():
        unmerged = model(ids).logits.float()
        model.base_model.merge_adapter()
        merged = model(ids).logits.float()
        model.base_model.unmerge_adapter()
    assert not torch.equal(unmerged, _base_logits(model, ids))  # the adapter does change the output
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=0.05 * float(unmerged.abs().max()))


def _base_logits(model, ids):
    with torch.no_grad(), model.disable_adapter():
        return model(ids).logits.float()


def test_gradient_checkpointing_recomputes_with_the_same_projections(tiny_llama, ids):
    model = _model(tiny_llama, init_weights=False)
    model.to(torch.bfloat16)
    checkpointed = copy.deepcopy(model)
    checkpointed.base_model.model.gradient_checkpointing_enable({"use_reentrant": False})
    checkpointed.enable_input_require_grads()
    grads = []
    for m in (model, checkpointed):
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        assert torch.equal(grads[1][name], grad), name


def test_a_copy_made_under_inference_mode_serves_training(tiny_llama, ids):
    model = _model(tiny_llama, init_weights=False)
    model.to(torch.bfloat16)
    with torch.inference_mode():  # e.g. generation between training steps: the copy is made here
        model(ids)
    model(input_ids=ids, labels=ids).loss.backward()  # and saved for this backward
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.uora_lambda_d["default"].grad is not None
