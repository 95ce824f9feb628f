"""The ENGM math on plain tensors: the normalization floor, the per-example weights, the direction's divisor."""

from engm_opacus.functional.normalization import (
    GammaSetting,
    engm_weights,
    nonfinite_norms_error,
    validate_gamma,
    validate_gamma_setting,
)

__all__ = ["GammaSetting", "engm_weights", "nonfinite_norms_error", "validate_gamma", "validate_gamma_setting"]
