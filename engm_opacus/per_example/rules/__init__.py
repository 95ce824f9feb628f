"""Per-layer rules: per-example gradient norms and the weighted gradient from one backward's records.

Importing this package registers the built-in rules (Linear, Conv{1,2,3}d, BatchNorm{1,2,3}d, Embedding,
GroupNorm); every other layer Opacus has a grad sampler for is served through it.
"""

from engm_opacus.per_example.rules import conv, embedding, linear, normalization  # noqa: F401  (registration)
from engm_opacus.per_example.rules.base import RULES, LayerReduction, LayerRule, ParamTensors, register_rule, rule_for

__all__ = ["RULES", "LayerReduction", "LayerRule", "ParamTensors", "register_rule", "rule_for"]
