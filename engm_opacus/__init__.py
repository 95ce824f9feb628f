"""engm-opacus: ENGM as a drop-in outer optimizer for adversarial training, on Opacus."""

from engm_opacus.attacks import pgd_linf
from engm_opacus.cheap import InputNormENGMOptimizer, InputNormStepStats
from engm_opacus.evaluation import evaluate
from engm_opacus.ghost import TwoPassENGMOptimizer
from engm_opacus.losses import get_at_loss
from engm_opacus.optimizer import ENGMOptimizer, ENGMStepStats
from engm_opacus.per_example_norms import norms_from_grad_samples
from engm_opacus.step import train_step
from engm_opacus.training import TrainConfig, TrainResult, train
from engm_opacus.weights import engm_weights, validate_gamma
from engm_opacus.wrap import make_engm

__all__ = [
    "ENGMOptimizer",
    "ENGMStepStats",
    "InputNormENGMOptimizer",
    "InputNormStepStats",
    "TrainConfig",
    "TrainResult",
    "TwoPassENGMOptimizer",
    "engm_weights",
    "evaluate",
    "get_at_loss",
    "make_engm",
    "norms_from_grad_samples",
    "pgd_linf",
    "train",
    "train_step",
    "validate_gamma",
]
__version__ = "0.1.0"
