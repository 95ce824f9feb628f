"""The per-layer rule interface, its registry, and the rule that goes through per-example gradients.

A rule turns a layer's recorded calls of one backward pass into a :class:`LayerReduction`, which
gives, for each trainable parameter ``p`` of the layer and each example ``i`` (``b`` = raw
``dL/d output``, no batch-size factor):

* ``squared_norms()``: ``||sum_calls dL/dp^(i)||^2`` (a layer called on ``x`` and ``x_adv``
  contributes the norm of the *sum* of its calls' gradients);
* ``weighted_grads(v)``: ``sum_i v_i sum_calls dL/dp^(i)`` for per-example factors ``v_i``.

A reduction may keep what ``squared_norms`` computed (e.g. instantiated per-example gradients) to
make ``weighted_grads`` cheap; ``weighted_grads`` also works without ``squared_norms`` (the
input-norm variant between calibrations).

Rules are looked up by the layer's exact type: first this package's :data:`RULES`
(:func:`register_rule`), then Opacus's grad-sampler registry
(``GradSampleModule.GRAD_SAMPLERS``, which ``opacus.grad_sample.register_grad_sampler`` extends),
wrapped in :class:`OpacusGradSamplerRule`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Type, TypeVar

import torch
from opacus.grad_sample import GradSampleModule
from torch import nn

from engm_opacus.per_example.records import LayerCall

ParamTensors = Dict[nn.Parameter, torch.Tensor]


class LayerReduction(Protocol):
    """One layer's share of one backward pass: its per-example squared norms and weighted gradient."""

    def squared_norms(self) -> ParamTensors:
        """Per parameter, ``[B]`` squared norms of ``sum_calls dL/dp^(i)``."""
        ...

    def weighted_grads(self, factors: torch.Tensor) -> ParamTensors:
        """Per parameter, ``sum_i factors[i] * sum_calls dL/dp^(i)``."""
        ...


class LayerRule(Protocol):
    """How ENGM gets per-example norms and the weighted gradient of one layer type."""

    def forward_state(self, layer: nn.Module, activations: Sequence[Any], output: torch.Tensor) -> Any:
        """What must be kept at forward time besides the inputs and output gradient (``None`` for most layers)."""
        ...

    def reduction(self, layer: nn.Module, calls: List[LayerCall]) -> LayerReduction:
        """The layer's reduction over its calls in one backward pass."""
        ...


RULES: Dict[Type[nn.Module], LayerRule] = {}
"""This package's rules by exact layer type; :func:`register_rule` adds to it."""

R = TypeVar("R")


def register_rule(*layer_types: Type[nn.Module]) -> Callable[[R], R]:
    """Class decorator: register an instance of the decorated rule class for ``layer_types``."""

    def register(rule_class: R) -> R:
        for layer_type in layer_types:
            RULES[layer_type] = rule_class()  # type: ignore[operator]
        return rule_class

    return register


def add_into(total: ParamTensors, grads: ParamTensors) -> ParamTensors:
    """``total[p] += grads[p]`` for every ``p`` (inserting new ones); returns ``total``."""
    for p, g in grads.items():
        total[p] = g if p not in total else total[p] + g
    return total


class PerExampleGrads:
    """A reduction from instantiated per-example gradients ``[B, *p.shape]`` (summed over calls)."""

    def __init__(self, grads: ParamTensors):
        self.grads = grads

    def squared_norms(self) -> ParamTensors:
        """``||g_p^(i)||^2`` per parameter."""
        return {p: squared_row_norms(g) for p, g in self.grads.items()}

    def weighted_grads(self, factors: torch.Tensor) -> ParamTensors:
        """``sum_i v_i g_p^(i)`` per parameter."""
        return {p: torch.einsum("i,i...->...", factors.to(g), g) for p, g in self.grads.items()}


class InputOnlyRule:
    """Base of the rules that keep nothing at forward time beyond the layer's input."""

    def forward_state(self, layer: nn.Module, activations: Sequence[Any], output: torch.Tensor) -> Any:
        """Nothing beyond the input."""
        return None


class PerExampleGradRule(InputOnlyRule):
    """A rule for layers whose per-example gradients are small: compute them per call, sum, reduce.

    Subclasses implement :meth:`per_example_grads` for one call.
    """

    def per_example_grads(self, layer: nn.Module, call: LayerCall) -> ParamTensors:
        """``[B, *p.shape]`` gradients ``dL/dp^(i)`` of one call, for the parameters it reached."""
        raise NotImplementedError

    def reduction(self, layer: nn.Module, calls: List[LayerCall]) -> PerExampleGrads:
        """Per-example gradients summed over the calls."""
        total: ParamTensors = {}
        for call in calls:
            add_into(total, self.per_example_grads(layer, call))
        return PerExampleGrads(total)


class OpacusGradSamplerRule(PerExampleGradRule):
    """Any layer Opacus registers a grad sampler for (LayerNorm, Embedding, InstanceNorm, RMSNorm, ...).

    The sampler is called with the raw output gradient (Opacus's ``loss_reduction`` scaling is
    not applied: the optimizer applies ENGM's own), so it returns ``dL/dp^(i)``.
    """

    def __init__(self, sampler: Callable[..., ParamTensors]):
        self.sampler = sampler

    def per_example_grads(self, layer: nn.Module, call: LayerCall) -> ParamTensors:
        """Opacus's per-sample gradients of this call, restricted to the parameters it reached."""
        dtype = compute_dtype(layer)
        backprops = call.backprops.to(dtype)
        activations = [a.to(dtype) if _is_float(a) else a for a in call.activations]
        grads = self.sampler(layer, activations, backprops)
        return {p: g for p, g in grads.items() if call.reaches(p)}


NOT_PER_ROW = frozenset({"EmbeddingBag", "RNNLinear", "SequenceBias"})
"""Opacus layers whose examples are not the rows of the layer's first input (bags with offsets, the
time-major cells of ``DPLSTM``/``DPGRU``/``DPRNN``, ``DPMultiheadAttention``'s sequence-first bias): refused."""


def rule_for(layer: nn.Module) -> Optional[LayerRule]:
    """The rule for ``layer``'s exact type, or ``None`` when neither registry has a usable one."""
    rule = RULES.get(type(layer))
    if rule is not None:
        return rule
    if type(layer).__name__ in NOT_PER_ROW:
        return None
    sampler = GradSampleModule.GRAD_SAMPLERS.get(type(layer))
    return None if sampler is None else OpacusGradSamplerRule(sampler)


def compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype per-example work is done in: the layer's parameters' (fp32 under autocast)."""
    return next(layer.parameters()).dtype


def scaled_per_example(b: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """``b`` with example ``i``'s rows multiplied by ``factors[i]``."""
    return b * factors.to(b.dtype).view(-1, *[1] * (b.dim() - 1))


def squared_row_norms(values: torch.Tensor) -> torch.Tensor:
    """``[B]`` squared norms of each example's slice ``values[i]`` (one fused pass)."""
    return torch.linalg.vector_norm(values.reshape(len(values), -1), dim=1).square()


def _is_float(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()
