"""``ENGMStepStats``: what the last ENGM step saw, from tensors the step already had."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class ENGMStepStats:
    """Diagnostics of one ``optimizer.step()``.

    Attributes:
        per_example_norms: ``[N]`` norms ``n_i`` the weights were computed from (exact, or the
            input-norm estimate ``s * m_i`` on steps that did not calibrate), detached.
        weights: ``[N]`` weights ``w_i = 1/max(n_i, gamma)``.
        fraction_above_gamma: share of examples with ``n_i > gamma`` (those that were normalized).
        direction_norm: ``||d||_2`` handed to the wrapped optimizer (``nan`` when skipped).
        skipped: ``True`` when the step was skipped (non-finite norms with ``on_nonfinite="skip"``,
            or a ``GradScaler`` overflow); parameters and momentum are untouched then.
        scale: the input-norm variant's scale ``s`` after this step (``None`` for exact ENGM).
        calibrated: input-norm variant: exact norms were computed on this step and ``s`` refitted.
        gamma: the floor the weights used.
        calibration_error: on calibration steps, the median relative error
            ``|s_old * m_i - n_i| / n_i`` of the estimate with the scale used before this step.
    """

    per_example_norms: torch.Tensor
    weights: torch.Tensor
    fraction_above_gamma: float
    direction_norm: float
    skipped: bool
    scale: Optional[float] = None
    calibrated: bool = False
    calibration_error: Optional[float] = None
    gamma: Optional[float] = None
