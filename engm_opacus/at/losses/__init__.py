"""Registry of the adversarial-training losses: ``get_at_loss(name, **options)`` builds one by name.

Every loss returns the mean-reduced training loss ``L`` (see :mod:`engm_opacus.at.losses.base`).
``"awp-<name>"`` wraps ``"pgd-at"`` or ``"trades"`` in adversarial weight perturbation
(keyword ``gamma_awp``, the other keywords go to the wrapped adapter).
"""

from __future__ import annotations

from typing import Any, Dict, Tuple, Type, Union

from engm_opacus.at.losses.awp import AWP, perturbable_weights
from engm_opacus.at.losses.base import ATLoss, ATLossOutput, AttackThenLoss, PerturbsWeights
from engm_opacus.at.losses.mart import MART
from engm_opacus.at.losses.pgd_at import PGDAT
from engm_opacus.at.losses.trades import TRADES

AT_METHODS: Dict[str, Type[AttackThenLoss]] = {"pgd-at": PGDAT, "trades": TRADES, "mart": MART}
AWP_PREFIX = "awp-"
AWP_INNER_METHODS: Tuple[str, ...] = ("pgd-at", "trades")


def at_method_names() -> Tuple[str, ...]:
    """Every name :func:`get_at_loss` accepts: the base methods and ``awp-pgd-at``, ``awp-trades``."""
    return tuple(AT_METHODS) + tuple(AWP_PREFIX + name for name in AWP_INNER_METHODS)


def get_at_loss(name: str, **options: Any) -> Union[AttackThenLoss, AWP]:
    """Build the AT loss called ``name`` with ``options``.

    For ``"awp-<method>"``, ``gamma_awp`` goes to :class:`AWP` and the other options to ``<method>``.

    Raises:
        ValueError: ``name`` is unknown (the message lists the known names), or an option is invalid.
    """
    if name not in at_method_names():
        raise ValueError(f"Unknown AT method {name!r}. Fix: use one of {', '.join(at_method_names())}.")
    if name.startswith(AWP_PREFIX):
        awp_options = {"gamma_awp": options.pop("gamma_awp")} if "gamma_awp" in options else {}
        return AWP(AT_METHODS[name[len(AWP_PREFIX) :]](**options), **awp_options)
    return AT_METHODS[name](**options)


__all__ = [
    "AT_METHODS",
    "AWP",
    "ATLoss",
    "ATLossOutput",
    "AttackThenLoss",
    "MART",
    "PGDAT",
    "PerturbsWeights",
    "TRADES",
    "at_method_names",
    "get_at_loss",
    "perturbable_weights",
]
