"""Adversarial-training loss adapters returning per-example losses, and their registry.

``get_at_loss("trades", beta=6.0)`` builds an adapter by name; ``"awp-<name>"`` wraps
``"pgd-at"`` or ``"trades"`` in adversarial weight perturbation (keyword ``gamma_awp``,
the other keywords go to the wrapped adapter).
"""

from __future__ import annotations

from typing import Any, Dict, Tuple, Type, Union

from engm_opacus.losses.awp import AWP
from engm_opacus.losses.base import ATLoss, ATLossOutput, AttackResult, AttackThenLoss, PerturbsWeights
from engm_opacus.losses.mart import MART
from engm_opacus.losses.pgd_at import PGDAT
from engm_opacus.losses.trades import TRADES

AT_METHODS: Dict[str, Type[AttackThenLoss]] = {"pgd-at": PGDAT, "trades": TRADES, "mart": MART}
AWP_PREFIX = "awp-"
AWP_INNER_METHODS: Tuple[str, ...] = ("pgd-at", "trades")


def at_method_names() -> Tuple[str, ...]:
    """Every name :func:`get_at_loss` accepts: the base methods and ``awp-pgd-at``, ``awp-trades``."""
    return tuple(AT_METHODS) + tuple(AWP_PREFIX + name for name in AWP_INNER_METHODS)


def get_at_loss(name: str, **kwargs: Any) -> Union[AttackThenLoss, AWP]:
    """Build the adapter called ``name`` with ``kwargs``; ``ValueError`` listing valid names otherwise.

    For ``"awp-<method>"``, ``gamma_awp`` goes to :class:`AWP` and the other keywords to ``<method>``.
    """
    if name not in at_method_names():
        raise ValueError(f"Unknown AT method {name!r}. Fix: use one of {', '.join(at_method_names())}.")
    if name.startswith(AWP_PREFIX):
        awp_kwargs = {"gamma_awp": kwargs.pop("gamma_awp")} if "gamma_awp" in kwargs else {}
        return AWP(AT_METHODS[name[len(AWP_PREFIX) :]](**kwargs), **awp_kwargs)
    return AT_METHODS[name](**kwargs)


__all__ = [
    "AT_METHODS",
    "AWP",
    "ATLoss",
    "ATLossOutput",
    "AttackResult",
    "AttackThenLoss",
    "MART",
    "PGDAT",
    "PerturbsWeights",
    "TRADES",
    "at_method_names",
    "get_at_loss",
]
