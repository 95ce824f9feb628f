"""The ENGM weight ``w_i = 1/max(n_i, gamma)`` and the floor's validation."""

from __future__ import annotations

import math

import pytest
import torch

from engm_opacus.functional import engm_weights, nonfinite_norms_error, validate_gamma


def test_weight_is_opacus_clip_factor_over_gamma() -> None:
    norms = torch.tensor([0.0, 0.5, 1.0, 2.0, 40.0], dtype=torch.float64)
    gamma = 1.0
    clip_factor = torch.clamp(gamma / norms, max=1.0)  # Opacus: min(1, C / n_i) (without its 1e-6)
    torch.testing.assert_close(engm_weights(norms, gamma), clip_factor / gamma, rtol=0, atol=0)
    assert engm_weights(norms, gamma).dtype == torch.float64


def test_weighted_norm_is_at_most_one_and_equal_above_gamma() -> None:
    norms = torch.tensor([0.1, 3.0, 7.0], dtype=torch.float64)
    scaled = engm_weights(norms, 0.5) * norms
    torch.testing.assert_close(scaled, torch.tensor([0.2, 1.0, 1.0], dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("gamma", [1, 0.25, "2.5"])
def test_valid_gamma_is_returned_as_float(gamma: object) -> None:
    assert validate_gamma(gamma) == float(gamma)


@pytest.mark.parametrize("gamma", [0, -0.1, math.inf, math.nan, "x", None, [1.0]])
def test_invalid_gamma_names_the_problem_and_the_fix(gamma: object) -> None:
    with pytest.raises(ValueError, match="positive finite number.*Fix: pass e.g. gamma=1.0"):
        validate_gamma(gamma)


def test_nonfinite_error_names_the_examples_and_both_fixes() -> None:
    error = nonfinite_norms_error(torch.tensor([1.0, math.nan, 2.0, math.inf]))
    assert isinstance(error, FloatingPointError)
    assert "examples [1, 3] of 4" in str(error) and "lower the learning rate" in str(error) and "on_nonfinite='skip'" in str(error)
