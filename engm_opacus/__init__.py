"""engm-opacus: ENGM as a drop-in outer optimizer for adversarial training, on Opacus.

``import engm_opacus`` loads only the core (``functional``, ``per_example``, ``optim``, ``wrap``);
the adversarial-training layer and the experiment harness load on first use of their names.
"""

from importlib import import_module
from typing import Any

from engm_opacus.functional import engm_weights, validate_gamma
from engm_opacus.optim import ENGMOptimizer, ENGMStepStats, InputNormEstimator
from engm_opacus.per_example import ENGMModule, register_rule
from engm_opacus.wrap import make_engm

LAZY_NAMES = {
    "get_at_loss": "engm_opacus.at.losses",
    "pgd_linf": "engm_opacus.at.attacks",
    "train_step": "engm_opacus.at.step",
    "evaluate": "engm_opacus.training.evaluation",
    "train": "engm_opacus.training.loop",
    "TrainConfig": "engm_opacus.training.config",
    "TrainResult": "engm_opacus.training.loop",
}
"""Harness names re-exported here, imported from their module on first access."""

__all__ = [
    "ENGMModule",
    "ENGMOptimizer",
    "ENGMStepStats",
    "InputNormEstimator",
    "engm_weights",
    "make_engm",
    "register_rule",
    "validate_gamma",
    *LAZY_NAMES,
]
__version__ = "0.2.0"


def __getattr__(name: str) -> Any:
    """Import a harness name (``get_at_loss``, ``train``, ...) from its module on first access."""
    if name in LAZY_NAMES:
        return getattr(import_module(LAZY_NAMES[name]), name)
    raise AttributeError(f"module 'engm_opacus' has no attribute {name!r}")
