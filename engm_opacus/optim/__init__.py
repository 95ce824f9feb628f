"""Optimizers: ENGM on top of a ``torch.optim`` optimizer, its step diagnostics and the input-norm estimator."""

from engm_opacus.optim.engm import ENGMOptimizer, NonFinitePolicy, require_torch_optimizer
from engm_opacus.optim.input_norm import InputNormEstimator
from engm_opacus.optim.stats import ENGMStepStats

__all__ = ["ENGMOptimizer", "ENGMStepStats", "InputNormEstimator", "NonFinitePolicy", "require_torch_optimizer"]
