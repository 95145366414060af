"""Uniform (Haar) orthogonal initialisation: orthonormal, seeded, identical everywhere."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model

from uora import UoraConfig
from uora.init import derived_seed, haar_orthogonal, init_projection_pair, kaiming_uniform


@pytest.mark.parametrize(("r", "n_in", "n_out"), [(8, 64, 48), (64, 64, 64), (1, 10, 7)])
def test_rows_of_a_and_columns_of_b_are_orthonormal(r, n_in, n_out):
    a, b = init_projection_pair(r, n_in, n_out, seed=5)
    assert a.shape == (r, n_in) and b.shape == (n_out, r) and a.dtype == torch.float32
    torch.testing.assert_close(a @ a.T, torch.eye(r), atol=1e-5, rtol=0)
    torch.testing.assert_close(b.T @ b, torch.eye(r), atol=1e-5, rtol=0)


def test_rank_above_dimension_gives_orthonormal_columns_of_a():
    a, _ = init_projection_pair(r=40, in_features=16, out_features=64, seed=0)
    torch.testing.assert_close(a.T @ a, torch.eye(16), atol=1e-5, rtol=0)


def test_same_seed_same_matrices_different_seed_different():
    a1, b1 = init_projection_pair(16, 32, 24, seed=7)
    a2, b2 = init_projection_pair(16, 32, 24, seed=7)
    a3, _ = init_projection_pair(16, 32, 24, seed=8)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert not torch.allclose(a1, a3)


def test_sign_correction_makes_the_qr_unbiased():
    # LAPACK's QR fixes the sign of R's diagonal by convention, which biases Q (e.g. the sign of a
    # unit vector's first entry). After the sign correction the draw is Haar: symmetric around 0.
    firsts = torch.stack([haar_orthogonal(6, 1, torch.Generator().manual_seed(s))[0, 0] for s in range(400)])
    assert abs(firsts.mean().item()) < 0.1
    assert (firsts > 0).float().mean().item() == pytest.approx(0.5, abs=0.1)


def test_kaiming_option_matches_veras_bound():
    a = kaiming_uniform(8, 50, torch.Generator().manual_seed(0))
    bound = math.sqrt(6.0 / 50)
    assert a.abs().max().item() <= bound and a.abs().max().item() > 0.8 * bound


def test_derived_seeds_are_distinct_and_stable():
    seeds = {derived_seed(s, k) for s in range(5) for k in range(5)}
    assert len(seeds) == 25
    assert derived_seed(0, 0) == derived_seed(0, 0)


def test_model_projections_are_the_seeded_haar_pair(tiny_llama):
    cfg = UoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"], projection_prng_key=11)
    model = get_peft_model(tiny_llama(), cfg)
    a, b = model.base_model.uora_A["default"], model.base_model.uora_B["default"]
    # in_max = 64 (down_proj input), out_max = 32 (q_proj/down_proj output)
    expected_a, expected_b = init_projection_pair(8, 64, 32, seed=11)
    assert torch.equal(a, expected_a) and torch.equal(b, expected_b)
    torch.testing.assert_close(a @ a.T, torch.eye(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(b.T @ b, torch.eye(8), atol=1e-5, rtol=0)
    cfg_again = UoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"], projection_prng_key=11)
    again = get_peft_model(tiny_llama(seed=3), cfg_again)
    assert torch.equal(again.base_model.uora_A["default"], a)
