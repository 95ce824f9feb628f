"""``gamma="auto"``: the normalization floor follows a running quantile of the recent per-example norms.

With ``q`` the quantile and ``W`` the window (in steps), the floor of step ``t`` is

.. math::

    \\gamma_t = \\operatorname{quantile}_q\\big(\\{n_i : i \\text{ in steps } t-W, \\dots, t-1\\}\\big)

(the norms of the step itself on the first step, which has no history). So a share of about
``1 - q`` of the examples is normalized (``n_i > gamma``) and the rest enter with the common
weight ``1/gamma``, whatever the network's norm scale. Only past steps enter after the first,
so the exact and the input-norm variants use the same rule (the input-norm variant may need the
floor before the step's backward). ``q`` and ``W`` are this library's choices, not the paper's.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Deque, Dict, Optional

import torch

EMPTY_FLOOR = 1.0
"""The floor when no recent norm is positive and finite (every gradient zero): any positive value gives ``d = 0``."""


class AutoGamma:
    """The running-quantile floor.

    Args:
        quantile: ``q`` in ``(0, 1)``; ``0.5`` (the median: half the examples normalized) by default.
        window: ``W``, the number of past steps whose norms enter the quantile.
    """

    def __init__(self, quantile: float = 0.5, window: int = 50):
        if not (isinstance(quantile, (int, float)) and 0.0 < float(quantile) < 1.0):
            raise ValueError(f"gamma_quantile must be in (0, 1), got {quantile!r}. Fix: e.g. 0.5 (the median norm).")
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"gamma_window must be a positive int (steps), got {window!r}. Fix: e.g. 50.")
        self.quantile = float(quantile)
        self.window = window
        self._history: Deque[torch.Tensor] = deque(maxlen=window)

    @property
    def ready(self) -> bool:
        """Whether past steps exist (the floor does not depend on the coming step's norms)."""
        return bool(self._history)

    def value(self, current: Optional[torch.Tensor] = None) -> float:
        """``gamma_t`` from the window, or from ``current`` (this step's norms) when there is no history yet."""
        norms = torch.cat(list(self._history)) if self._history else current
        if norms is None:
            raise RuntimeError("gamma='auto' has no per-example norms yet; the first step computes them.")
        finite = norms[torch.isfinite(norms) & (norms > 0)]
        if len(finite) == 0:
            return EMPTY_FLOOR
        return float(torch.quantile(finite.double().cpu(), self.quantile))

    def state_dict(self) -> Dict[str, Any]:
        """The window's norms (checkpoints)."""
        return {"history": [norms.clone() for norms in self._history]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self._history = deque((torch.as_tensor(n, dtype=torch.float64) for n in state["history"]), maxlen=self.window)

    def update(self, norms: torch.Tensor) -> None:
        """Add one step's norms to the window."""
        self._history.append(norms.detach().double().cpu())
