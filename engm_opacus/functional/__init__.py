"""The ENGM math on plain tensors: the normalization floor, the per-example weights, the direction's divisor."""

from engm_opacus.functional.normalization import engm_weights, nonfinite_norms_error, validate_gamma

__all__ = ["engm_weights", "nonfinite_norms_error", "validate_gamma"]
