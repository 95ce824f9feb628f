"""The input-norm variant's estimator: ``n_i ~= s * m_i`` with ``m_i`` the input-gradient norm of example ``i``.

ENGM's cheap variant (Dabouei et al.) replaces the parameter-gradient norm by the norm of the
gradient w.r.t. the input, which correlates with it. With ``m_i = B * ||dL/dx_i||_2`` (over all
floating-point inputs of the model's calls in the backward pass: ``x`` and ``x_adv`` for TRADES;
or, with ``input_grad_source="attack"``, of the attack loss at its last iterate), the estimate is
``n_i ~= s * m_i`` (``B`` only for a mean-reduced loss). A global ``s`` matters whenever ``gamma`` is active, so it is
calibrated against exact norms: on the first step and every ``calibrate_every`` steps the exact
``n_i`` are computed from the same records, ``s`` is set to ``median_i(n_i / m_i)`` (first time)
or moved towards it geometrically (``log s <- (1 - beta) log s + beta log s_new``), and those
steps use the exact norms. A fixed ``scale`` disables calibration.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Optional

import torch

DRIFT_WARNING = 0.5
"""Relative calibration error above which a calibration step warns that ``s`` had drifted."""


class InputNormEstimator:
    """Estimate per-example gradient norms from input-gradient norms, calibrated by a running scale.

    Args:
        scale: a fixed ``s`` (no calibration), or ``None`` to calibrate.
        calibrate_every: calibrate on the first step and every ``K`` steps after it.
        calibration_momentum: ``beta`` of the geometric running average of ``s``.
    """

    def __init__(self, *, scale: Optional[float] = None, calibrate_every: int = 10, calibration_momentum: float = 0.5):
        if scale is not None and not (math.isfinite(float(scale)) and float(scale) > 0):
            raise ValueError(f"input_norm_scale must be a positive finite number or None, got {scale!r}.")
        if not isinstance(calibrate_every, int) or calibrate_every < 1:
            raise ValueError(f"calibrate_every must be a positive int, got {calibrate_every!r}. Fix: e.g. 10.")
        if not 0.0 < calibration_momentum <= 1.0:
            raise ValueError(f"calibration_momentum must be in (0, 1], got {calibration_momentum!r}.")
        self.fixed = scale is not None
        self.scale: Optional[float] = None if scale is None else float(scale)
        self.calibrate_every = calibrate_every
        self.calibration_momentum = calibration_momentum
        self.steps = 0
        self.last_calibration_error: Optional[float] = None

    def state_dict(self) -> Dict[str, Any]:
        """``scale``, ``steps`` and the last calibration error (checkpoints)."""
        return {"scale": self.scale, "steps": self.steps, "last_calibration_error": self.last_calibration_error}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a fixed scale stays the one given to the constructor."""
        self.steps, self.last_calibration_error = state["steps"], state["last_calibration_error"]
        if not self.fixed:
            self.scale = state["scale"]

    @property
    def calibrating(self) -> bool:
        """Whether the coming step computes exact norms and refits ``s``."""
        return not self.fixed and (self.scale is None or self.steps % self.calibrate_every == 0)

    @staticmethod
    def input_norms(input_grads: List[torch.Tensor], factor: float) -> torch.Tensor:
        """``[B]`` ``m_i = factor * sqrt(sum over inputs ||dL/dx_i||^2)``."""
        if not input_grads:
            raise RuntimeError(
                "The input-norm variant found no input gradient in a backward pass that reached the parameters. "
                "Fix: compute the training loss with the model returned by make_engm (not the original module), "
                "on floating-point inputs."
            )
        squared = sum(g.reshape(len(g), -1).double().square().sum(1) for g in input_grads)
        return factor * squared.sqrt()

    @staticmethod
    def attack_norms(norms: Optional[torch.Tensor], factor: float) -> torch.Tensor:
        """``[B]`` ``m_i = factor * ||dL_attack/dx_i||`` from the attack's last input gradient (``input_grad_source="attack"``;
        ``factor = B`` when the attack's loss is a batch mean, so that ``m_i`` does not depend on the batch size)."""
        if norms is None:
            raise RuntimeError(
                "The input-norm variant (input_grad_source='attack') found no attack input gradient paired with a "
                "backward pass that reached the parameters: no attack ran through the returned model on these rows "
                "before the training forward, the model returned no single tensor, or an attack's loss.backward() "
                "reached the parameters and was not cleared by optimizer.zero_grad(). Fix: attack through the model "
                "make_engm returned, return the logits tensor, clear the attack's gradients, or use "
                "input_grad_source='backward'."
            )
        return factor * norms

    def estimate(self, input_norms: torch.Tensor) -> torch.Tensor:
        """``s * m_i``."""
        return self.scale * input_norms

    def calibrate(self, exact: torch.Tensor, input_norms: torch.Tensor) -> None:
        """Refit ``s`` from exact norms; record the previous scale's median relative error."""
        usable = (input_norms > 0) & (exact > 0) & torch.isfinite(exact)
        if not bool(usable.any()):
            return
        fitted = float(torch.median(exact[usable] / input_norms[usable]))
        if self.scale is None:
            previous = fitted
            self.scale = fitted
        else:
            previous = self.scale
            beta = self.calibration_momentum
            self.scale = math.exp((1 - beta) * math.log(self.scale) + beta * math.log(fitted))
        error = float(torch.median((previous * input_norms[usable] - exact[usable]).abs() / exact[usable]))
        self.last_calibration_error = error
        if self.steps > 0 and error > DRIFT_WARNING:
            warnings.warn(
                f"The input-norm estimate had drifted: median relative error {error:.2f} against exact norms at "
                f"step {self.steps} (scale {previous:.4g} -> {self.scale:.4g}). Fix: calibrate more often "
                "(make_engm(..., calibrate_every=K) with a smaller K) or use exact ENGM.",
                RuntimeWarning,
                stacklevel=3,
            )
