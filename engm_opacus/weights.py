"""The ENGM per-example weight: the one place where ``w_i`` is defined.

.. math::

    w_i = \\frac{1}{\\max(n_i, \\gamma)}, \\qquad
    d = \\frac{1}{B} \\sum_{i=1}^{B} w_i \\, g_i

where ``n_i`` is (an estimate of) ``||g_i||_2`` and ``gamma > 0`` is the
normalization floor. Equivalently ``w_i = (1/gamma) * min(1, gamma / n_i)``:
Opacus's per-sample clip factor with ``max_grad_norm = gamma``, scaled by
``1/gamma``.
"""

from __future__ import annotations

import math

import torch


def validate_gamma(gamma: float) -> float:
    """Return ``gamma`` as a float, or raise ``ValueError`` unless ``0 < gamma < inf``."""
    try:
        value = float(gamma)
    except (TypeError, ValueError):
        raise ValueError(
            f"gamma must be a positive finite number, got {gamma!r}. "
            "Fix: pass e.g. gamma=1.0 (the normalization floor of w_i = 1/max(||g_i||, gamma))."
        ) from None
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(
            f"gamma must be a positive finite number, got {gamma!r}. "
            "Fix: pass e.g. gamma=1.0; gamma <= 0 would divide by a zero gradient norm, "
            "and gamma = inf would zero every update."
        )
    return value


def engm_weights(norms: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-example ENGM weights ``w_i = 1 / max(n_i, gamma)``.

    Args:
        norms: ``[B]`` tensor of per-example gradient norms ``n_i >= 0``.
        gamma: the normalization floor, ``gamma > 0``.

    Returns:
        ``[B]`` tensor of weights with the dtype and device of ``norms``.
    """
    return 1.0 / norms.clamp(min=gamma)
