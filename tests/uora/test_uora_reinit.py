"""The re-initialisation rule: exactly the planted slot moves, patience, resample, determinism, state."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from uora_helpers import adapter_state

import uora
from uora import UoraConfig
from uora.init import derived_seed, init_projection_pair

R = 8


def _model(tiny_llama, **kwargs):
    model = get_peft_model(tiny_llama(), UoraConfig(r=R, target_modules="all-linear", **kwargs))
    with torch.no_grad():
        for layer in model.base_model.uora_layers("default"):
            layer.uora_lambda_d["default"].fill_(1.0)  # every slot alive
    return model


def _plant(model, layer_index: int, slot: int, value: float = 0.0) -> None:
    with torch.no_grad():
        model.base_model.uora_layers("default")[layer_index].uora_lambda_d["default"][slot] = value


def _projections(model):
    tuner = model.base_model
    return tuner.uora_A["default"].clone(), tuner.uora_B["default"].clone()


def _target(model, draw: int = 0, seed: int = 0):
    a, b = _projections(model)
    return init_projection_pair(R, a.shape[1], b.shape[0], derived_seed(seed, draw))


def _assert_only_slot_moved(before, after, slot, keep, target):
    (a0, b0), (a1, b1), (ta, tb) = before, after, target
    others = [i for i in range(R) if i != slot]
    assert torch.equal(a1[others], a0[others]) and torch.equal(b1[:, others], b0[:, others])
    torch.testing.assert_close(a1[slot], keep * a0[slot] + (1 - keep) * ta[slot], atol=1e-6, rtol=0)
    torch.testing.assert_close(b1[:, slot], keep * b0[:, slot] + (1 - keep) * tb[:, slot], atol=1e-6, rtol=0)
    assert not torch.allclose(a1[slot], a0[slot])


def test_no_dead_slot_means_no_event_and_no_change(tiny_llama):
    model = _model(tiny_llama)
    before = _projections(model)
    assert uora.reinit_step(model) == 0
    after = _projections(model)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_planted_dead_slot_moves_exactly_row_i_of_a_and_column_i_of_b(tiny_llama):
    model = _model(tiny_llama, reinit_alpha=0.5)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(torch.randint(0, 128, (1, 5))).logits.sum().backward()
    opt.step()  # give the optimizer some state
    _plant(model, layer_index=3, slot=2, value=5e-6)  # |d| < τ = 1e-5
    opt_state = {k: {n: t.clone() for n, t in v.items()} for k, v in opt.state.items()}
    vectors = {k: v for k, v in adapter_state(model).items() if "lambda" in k}

    before = _projections(model)
    assert uora.reinit_step(model) == 1
    _assert_only_slot_moved(before, _projections(model), slot=2, keep=0.5, target=_target(model))
    # d, b and optimizer state untouched
    assert all(torch.equal(v, adapter_state(model)[k]) for k, v in vectors.items())
    for key, state in opt.state.items():
        assert all(torch.equal(t, opt_state[key][n]) for n, t in state.items())
    counts = model.base_model.uora_reinit_counts["default"]
    assert counts[3, 2] == 1 and counts.sum() == 1


def test_dead_slot_in_several_layers_composes_one_interpolation_per_layer(tiny_llama):
    model = _model(tiny_llama, reinit_alpha=0.5)
    for layer_index in (0, 5, 9):
        _plant(model, layer_index, slot=6)
    before = _projections(model)
    assert uora.reinit_step(model) == 3
    # three interpolations toward the same target: keep α³ of the old direction
    _assert_only_slot_moved(before, _projections(model), slot=6, keep=0.125, target=_target(model))


def test_fixed_target_pulls_a_dead_slot_toward_the_same_target(tiny_llama):
    model = _model(tiny_llama, reinit_alpha=0.5, reinit_seed=4)
    _plant(model, 1, slot=0)
    before = _projections(model)
    for _ in range(2):
        assert uora.reinit_step(model) == 1
    _assert_only_slot_moved(before, _projections(model), slot=0, keep=0.25, target=_target(model, seed=4))
    assert model.base_model.uora_reinit_draws["default"].item() == 0


def test_alpha_zero_replaces_the_slot_by_the_target(tiny_llama):
    model = _model(tiny_llama, reinit_alpha=0.0)
    _plant(model, 0, slot=1)
    uora.reinit_step(model)
    target_a, target_b = _target(model)
    a, b = _projections(model)
    torch.testing.assert_close(a[1], target_a[1], atol=1e-7, rtol=0)
    torch.testing.assert_close(b[:, 1], target_b[:, 1], atol=1e-7, rtol=0)


def test_patience_waits_k_checks_and_counters_are_never_reset(tiny_llama):
    model = _model(tiny_llama, reinit_patience=3)
    _plant(model, 2, slot=4)
    assert [uora.reinit_step(model) for _ in range(3)] == [0, 0, 1]
    _plant(model, 2, slot=4, value=1.0)  # alive: counter stays at 3
    assert uora.reinit_step(model) == 0
    _plant(model, 2, slot=4, value=0.0)
    assert [uora.reinit_step(model) for _ in range(3)] == [0, 0, 1]
    assert model.base_model.uora_reinit_counts["default"][2, 4] == 6
    assert uora.total_reinit_events(model) == 2


def test_resample_draws_a_new_target_per_check(tiny_llama):
    model = _model(tiny_llama, reinit_target="resample", reinit_seed=1)
    _plant(model, 4, slot=3)
    a0, b0 = _projections(model)
    uora.reinit_step(model)
    a1, b1 = _projections(model)
    uora.reinit_step(model)
    a2, b2 = _projections(model)
    t0, t1 = _target(model, draw=0, seed=1), _target(model, draw=1, seed=1)
    assert not torch.allclose(t0[0][3], t1[0][3])
    _assert_only_slot_moved((a0, b0), (a1, b1), 3, 0.5, t0)
    _assert_only_slot_moved((a1, b1), (a2, b2), 3, 0.5, t1)
    assert model.base_model.uora_reinit_draws["default"].item() == 2


def test_two_runs_with_the_same_seeds_are_identical(tiny_llama):
    states = []
    for _ in range(2):
        model = _model(tiny_llama, reinit_target="resample", reinit_patience=2)
        for layer_index, slot in ((0, 1), (3, 1), (7, 5)):
            _plant(model, layer_index, slot)
        for _ in range(5):
            uora.reinit_step(model)
        states.append(adapter_state(model))
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_save_load_restores_reinitialised_projections_and_state(tiny_llama, tmp_path):
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    model = _model(tiny_llama, reinit_target="resample")
    _plant(model, 6, slot=7)
    for _ in range(3):
        uora.reinit_step(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    expected, got = adapter_state(model), adapter_state(loaded)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    # the loaded state continues exactly like the original
    assert uora.reinit_step(loaded) == uora.reinit_step(model) == 1
    assert torch.equal(loaded.base_model.uora_A["default"], model.base_model.uora_A["default"])


def test_reinit_on_a_merged_adapter_is_refused(tiny_llama):
    model = _model(tiny_llama)
    model.base_model.merge_adapter()
    with pytest.raises(RuntimeError, match="unmerge first"):
        uora.reinit_step(model)


def test_reinit_step_needs_a_uora_model(tiny_llama):
    with pytest.raises(ValueError, match="No UORA adapter found"):
        uora.reinit_step(tiny_llama())


def test_zero3_partitioned_d_is_gathered_before_the_check(tiny_llama, monkeypatch):
    """Under ZeRO-3 d is partitioned: the check reads it inside deepspeed.zero.GatheredParameters
    (deepspeed is imported only then). A stub stands in for deepspeed, which is not installed here."""
    import contextlib
    import sys
    import types

    gathered = []

    @contextlib.contextmanager
    def gathered_parameters(params, modifier_rank=None):
        gathered.append((list(params), modifier_rank))
        yield

    stub = types.ModuleType("deepspeed")
    stub.zero = types.SimpleNamespace(GatheredParameters=gathered_parameters)
    monkeypatch.setitem(sys.modules, "deepspeed", stub)

    model = _model(tiny_llama)
    _plant(model, 2, slot=5)
    assert uora.reinit_step(model) == 1
    assert gathered == []  # ordinary parameters: no gathering
    for layer in model.base_model.uora_layers("default"):
        param = layer.uora_lambda_d["default"]
        param.ds_id, param.ds_status = id(param), "NOT_AVAILABLE"
    assert uora.reinit_step(model) == 1
    ((params, modifier_rank),) = gathered
    assert modifier_rank is None  # read-only gather: no rank broadcasts modifications
    assert [id(p) for p in params] == [
        id(layer.uora_lambda_d["default"]) for layer in model.base_model.uora_layers("default")
    ]
