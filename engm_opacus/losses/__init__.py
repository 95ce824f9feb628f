"""Adversarial-training loss adapters returning per-example losses, and their registry.

``get_at_loss("trades", beta=6.0)`` builds an adapter by name; ``"awp-<name>"`` wraps
``"pgd-at"`` or ``"trades"`` in adversarial weight perturbation (keyword ``gamma_awp``,
the other keywords go to the wrapped adapter).
"""

from __future__ import annotations

from typing import Any, Dict, Tuple, Type

from engm_opacus.losses.base import ATLoss, ATLossOutput, AttackResult, AttackThenLoss, PerturbsWeights
from engm_opacus.losses.pgd_at import PGDAT

AT_METHODS: Dict[str, Type[AttackThenLoss]] = {"pgd-at": PGDAT}
AWP_PREFIX = "awp-"


def at_method_names() -> Tuple[str, ...]:
    """Every name :func:`get_at_loss` accepts."""
    return tuple(AT_METHODS)


def get_at_loss(name: str, **kwargs: Any) -> AttackThenLoss:
    """Build the adapter called ``name`` with ``kwargs``; ``ValueError`` listing valid names otherwise."""
    if name not in AT_METHODS:
        raise ValueError(f"Unknown AT method {name!r}. Fix: use one of {', '.join(at_method_names())}.")
    return AT_METHODS[name](**kwargs)


__all__ = [
    "AT_METHODS",
    "ATLoss",
    "ATLossOutput",
    "AttackResult",
    "AttackThenLoss",
    "PGDAT",
    "PerturbsWeights",
    "at_method_names",
    "get_at_loss",
]
