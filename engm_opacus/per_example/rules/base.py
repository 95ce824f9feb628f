"""The per-layer rule interface, its registry, and the rule that goes through per-example gradients.

A rule turns a layer's recorded calls of one backward pass into, for each trainable parameter
``p`` of the layer and each example ``i`` (``b`` = raw ``dL/d output``, no batch-size factor):

* ``squared_norms``: ``||dL/dp^(i)||^2`` summed over the layer's calls first (a layer called on
  ``x`` and ``x_adv`` contributes the norm of the *sum* of its calls' gradients);
* ``weighted_grads``: ``sum_i v_i dL/dp^(i)`` for given per-example factors ``v_i``.

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


class LayerRule(Protocol):
    """How ENGM gets per-example norms and the weighted gradient of one layer type."""

    def forward_state(self, layer: nn.Module, activations: Sequence[Any]) -> Any:
        """What must be kept at forward time besides the inputs (``None`` for most layers)."""
        ...

    def squared_norms(self, layer: nn.Module, calls: List[LayerCall]) -> ParamTensors:
        """Per parameter, ``[B]`` squared norms of ``sum_calls dL/dp^(i)``."""
        ...

    def weighted_grads(self, layer: nn.Module, calls: List[LayerCall], factors: torch.Tensor) -> ParamTensors:
        """Per parameter, ``sum_i factors[i] * sum_calls dL/dp^(i)``."""
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


class PerExampleGradRule:
    """A rule for layers whose per-example gradients are small: compute them, then reduce.

    Subclasses implement :meth:`per_example_grads` for one call; the calls of a backward pass
    are summed per example, then ``squared_norms`` and ``weighted_grads`` are reductions.
    """

    def forward_state(self, layer: nn.Module, activations: Sequence[Any]) -> Any:
        """Nothing beyond the inputs."""
        return None

    def per_example_grads(self, layer: nn.Module, call: LayerCall) -> ParamTensors:
        """``[B, *p.shape]`` gradients ``dL/dp^(i)`` of one call, for the parameters it reached."""
        raise NotImplementedError

    def summed_per_example_grads(self, layer: nn.Module, calls: List[LayerCall]) -> ParamTensors:
        """``sum_calls dL/dp^(i)`` per parameter."""
        total: ParamTensors = {}
        for call in calls:
            for p, grads in self.per_example_grads(layer, call).items():
                total[p] = grads if p not in total else total[p] + grads
        return total

    def squared_norms(self, layer: nn.Module, calls: List[LayerCall]) -> ParamTensors:
        """``||sum_calls dL/dp^(i)||^2`` per parameter."""
        return {p: g.reshape(len(g), -1).square().sum(1) for p, g in self.summed_per_example_grads(layer, calls).items()}

    def weighted_grads(self, layer: nn.Module, calls: List[LayerCall], factors: torch.Tensor) -> ParamTensors:
        """``sum_i factors[i] * sum_calls dL/dp^(i)`` per parameter."""
        return {
            p: torch.einsum("i,i...->...", factors.to(g), g)
            for p, g in self.summed_per_example_grads(layer, calls).items()
        }


class OpacusGradSamplerRule(PerExampleGradRule):
    """Any layer Opacus registers a grad sampler for (LayerNorm, Embedding, InstanceNorm, RMSNorm, ...).

    The sampler is called with the raw output gradient (Opacus's ``loss_reduction`` scaling is
    not applied: the optimizer applies ENGM's own), so it returns ``dL/dp^(i)``.
    """

    def __init__(self, sampler: Callable[..., ParamTensors]):
        self.sampler = sampler

    def per_example_grads(self, layer: nn.Module, call: LayerCall) -> ParamTensors:
        """Opacus's per-sample gradients of this call, restricted to the parameters it reached."""
        backprops = call.backprops
        activations = [a.to(backprops.dtype) if _is_float(a) else a for a in call.activations]
        grads = self.sampler(layer, activations, backprops)
        return {p: grads[p] for p in call.params if any(p is q for q in grads)}


def rule_for(layer: nn.Module) -> Optional[LayerRule]:
    """The rule for ``layer``'s exact type, or ``None`` when neither registry has one."""
    rule = RULES.get(type(layer))
    if rule is not None:
        return rule
    sampler = GradSampleModule.GRAD_SAMPLERS.get(type(layer))
    return None if sampler is None else OpacusGradSamplerRule(sampler)


def compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype per-example work is done in: the layer's parameters' (fp32 under autocast)."""
    return next(layer.parameters()).dtype


def _is_float(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()
