"""UoraConfig validates at construction and names the offending field."""

from __future__ import annotations

import pytest

from uora import UoraConfig


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "UoraConfig.r must be a positive integer, got 0"),
        ({"r": -3}, "UoraConfig.r must be a positive integer, got -3"),
        ({"reinit_alpha": 1.0}, r"UoraConfig.reinit_alpha must lie in \[0, 1\), got 1.0"),
        ({"reinit_alpha": -0.1}, r"UoraConfig.reinit_alpha must lie in \[0, 1\), got -0.1"),
        ({"reinit_threshold": -1e-5}, "UoraConfig.reinit_threshold must be >= 0, got -1e-05"),
        ({"projection_init": "xavier"}, "UoraConfig.projection_init must be one of .*, got 'xavier'"),
        ({"reinit_target": "random"}, "UoraConfig.reinit_target must be one of .*, got 'random'"),
        ({"reinit_patience": 0}, "UoraConfig.reinit_patience must be an integer >= 1, got 0"),
        ({"uora_dropout": 1.5}, r"UoraConfig.uora_dropout must lie in \[0, 1\), got 1.5"),
        ({"bias": "lora_only"}, "UoraConfig.bias must be one of .*, got 'lora_only'"),
        ({"save_projection": False}, "UoraConfig.save_projection=False is not supported"),
    ],
)
def test_invalid_values_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UoraConfig(target_modules=["q_proj"], **kwargs)


def test_defaults_match_the_method_description():
    cfg = UoraConfig(target_modules="all-linear")
    assert cfg.projection_prng_key == 0 and cfg.d_initial == 0.1 and cfg.uora_dropout == 0.0
    assert cfg.projection_init == "orthogonal" and cfg.save_projection is True
    assert (cfg.reinit_threshold, cfg.reinit_alpha, cfg.reinit_patience) == (1e-5, 0.5, 1)
    assert (cfg.reinit_target, cfg.reinit_seed) == ("fixed", 0)
    assert cfg.target_modules == "all-linear"
