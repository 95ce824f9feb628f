"""Epoch means of the ENGM optimizer's per-step statistics (``optimizer.last_step``) for ``metrics.json``."""

from __future__ import annotations

import statistics
from typing import Any, Dict, List, Optional

import torch


class StepDiagnostics:
    """Epoch means of ``optimizer.last_step`` (:class:`~engm_opacus.optim.ENGMStepStats`) over the steps taken.

    Recorded per non-skipped step: ``fraction_above_gamma``, the median of ``per_example_norms`` and
    ``direction_norm``; for the input-norm variant also ``calibration_error`` (on calibration steps)
    and the last ``scale``. Skipped steps (``on_nonfinite="skip"``) are counted.
    """

    def __init__(self) -> None:
        self.values: Dict[str, List[float]] = {"fraction_above_gamma": [], "median_norm": [], "direction_norm": [], "calibration_error": []}
        self.skipped = 0
        self.scale: Optional[float] = None
        self.seen = False

    def add(self, optimizer: torch.optim.Optimizer) -> None:
        """Read the optimizer's ``last_step`` (no-op for a plain ``torch.optim`` optimizer)."""
        stats = getattr(optimizer, "last_step", None)
        if stats is None:
            return
        self.seen = True
        if stats.skipped:
            self.skipped += 1
            return
        self.values["fraction_above_gamma"].append(stats.fraction_above_gamma)
        self.values["median_norm"].append(float(stats.per_example_norms.median()))
        self.values["direction_norm"].append(stats.direction_norm)
        if stats.calibration_error is not None:
            self.values["calibration_error"].append(stats.calibration_error)
        if stats.scale is not None:
            self.scale = stats.scale

    def record(self) -> Dict[str, Any]:
        """``engm_mean_<name>`` per recorded value, ``engm_skipped_steps``, and ``engm_scale`` when there is one."""
        if not self.seen:
            return {}
        out: Dict[str, Any] = {f"engm_mean_{name}": statistics.fmean(v) for name, v in self.values.items() if v}
        out["engm_skipped_steps"] = self.skipped
        if self.scale is not None:
            out["engm_scale"] = self.scale
        return out
