"""ENGM's per-example normalization weight ``w_i = 1/max(n_i, gamma)``: the one place it is defined.

.. math::

    w_i = \\frac{1}{\\max(n_i, \\gamma)}, \\qquad
    d = \\frac{1}{N} \\sum_{i=1}^{N} w_i \\, g_i

where ``n_i = ||g_i||_2`` (or its input-norm estimate) and ``gamma > 0`` is the normalization
floor. Equivalently ``w_i = (1/gamma) * min(1, gamma / n_i)``: Opacus's per-sample clip factor
with ``max_grad_norm = gamma``, scaled by ``1/gamma``.
"""

from __future__ import annotations

import math

import torch


def validate_gamma(gamma: float) -> float:
    """Return ``gamma`` as a float, or raise ``ValueError`` unless ``0 < gamma < inf``."""
    try:
        value = float(gamma)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(
            f"gamma must be a positive finite number, got {gamma!r}. "
            "Fix: pass e.g. gamma=1.0 (the floor in w_i = 1/max(||g_i||, gamma)); gamma <= 0 would divide "
            "by a zero gradient norm and gamma = inf would zero every update."
        )
    return value


def engm_weights(norms: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-example ENGM weights ``w_i = 1 / max(n_i, gamma)``.

    Args:
        norms: ``[N]`` per-example gradient norms ``n_i >= 0``.
        gamma: the normalization floor, ``gamma > 0`` (validated by the caller).

    Returns:
        ``[N]`` weights with the dtype and device of ``norms``.
    """
    return 1.0 / norms.clamp(min=gamma)


def nonfinite_norms_error(norms: torch.Tensor) -> FloatingPointError:
    """The error for NaN/inf per-example norms, naming the examples and the two fixes."""
    bad = torch.nonzero(~torch.isfinite(norms)).flatten().tolist()
    where = f"examples {bad[:10]} of {len(norms)}" if bad else "examples of another data-parallel rank"
    return FloatingPointError(
        f"Non-finite per-example gradient norm for {where}. "
        "Fix: lower the learning rate or check the loss for log(0)/overflow; or pass "
        "on_nonfinite='skip' to make_engm to skip such steps (no update, momentum untouched)."
    )
