"""Per-example machinery: the Opacus module subclass that records one backward, and the per-layer rules."""

from engm_opacus.per_example.module import ENGMModule, unsupported_layers_error
from engm_opacus.per_example.records import BackwardRecord, LayerCall
from engm_opacus.per_example.rules import LayerReduction, LayerRule, register_rule, rule_for

__all__ = ["BackwardRecord", "ENGMModule", "LayerCall", "LayerReduction", "LayerRule", "register_rule", "rule_for", "unsupported_layers_error"]
