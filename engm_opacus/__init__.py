"""engm-opacus: ENGM as a drop-in outer optimizer for adversarial training, on Opacus."""

from engm_opacus.cheap import InputNormENGMOptimizer, InputNormStepStats
from engm_opacus.optimizer import ENGMOptimizer, ENGMStepStats
from engm_opacus.per_example_norms import norms_from_grad_samples
from engm_opacus.weights import engm_weights, validate_gamma
from engm_opacus.wrap import make_engm
from engm_opacus.training import TrainConfig, TrainResult, train

__all__ = [
    "ENGMOptimizer",
    "ENGMStepStats",
    "InputNormENGMOptimizer",
    "InputNormStepStats",
    "TrainConfig",
    "TrainResult",
    "engm_weights",
    "make_engm",
    "norms_from_grad_samples",
    "train",
    "validate_gamma",
]
__version__ = "0.1.0"
