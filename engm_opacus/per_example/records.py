"""What the single ordinary backward leaves for ENGM: one record per layer call, grouped by backward pass.

For a layer call ``c`` in a backward pass over ``B`` rows, the record keeps the call's inputs
``a`` (detached; the forward's own tensors, not copies) and the gradient ``b = dL/d out`` of
that backward's loss ``L`` w.r.t. the call's output. Per-layer rules
(:mod:`engm_opacus.per_example.rules`) turn them into each example's gradient w.r.t. its own
copy of the layer's parameters, ``dL/dtheta^(i)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn


@dataclass
class LayerCall:
    """One forward call of a layer, completed by the backward pass that reached its parameters.

    Attributes:
        layer: the module that was called.
        activations: its positional inputs, detached (same storage and version counter); at forward
            time ``None`` when autograd keeps the input (``saved_as``).
        versions: the kept inputs' version counters at forward time (an in-place change after the
            forward would make ``activations`` wrong; it is detected).
        forward_state: what the layer's rule kept at forward time (e.g. eval-mode BatchNorm's
            running statistics), or ``None``.
        params: the layer's trainable parameters that the backward pass reached.
        backprops: ``dL/d output`` of that backward pass (``None`` until it ran).
        saved_as: the attribute of the output's autograd node that holds the input, when the
            input is read from there at backward time instead of being kept.
    """

    layer: nn.Module
    activations: Optional[List[Any]]
    versions: List[int]
    forward_state: Any
    params: Tuple[nn.Parameter, ...]
    backprops: Optional[torch.Tensor] = None
    saved_as: Optional[str] = None

    def reaches(self, p: Optional[torch.Tensor]) -> bool:
        """Whether ``p`` is one of the parameters this call's backward reached (by identity)."""
        return p is not None and any(q is p for q in self.params)

    def check_unchanged(self) -> None:
        """Raise ``RuntimeError`` if an input of this call was modified in place after the forward."""
        for value, version in zip(self.activations, self.versions):
            if isinstance(value, torch.Tensor) and value._version != version:
                raise RuntimeError(
                    f"The input of {type(self.layer).__name__} was modified in place after the layer used it, "
                    "so its per-example gradients cannot be computed. Fix: make the in-place operation on that "
                    "input out of place (e.g. x = x + y instead of x += y, or ReLU(inplace=False) before the layer)."
                )


@dataclass
class BackwardRecord:
    """Everything one backward pass recorded: the calls of each layer it reached, and input gradients.

    Attributes:
        calls: per layer, its calls in this backward pass (several for TRADES/MART or tied layers),
            kept whole until ``step()``.
        per_example: per layer whose per-example gradients are small (normalization layers,
            Embedding, ...), ``dL/dp^(i)`` summed over its calls, computed as each call's backward
            ran so that the call's inputs and output gradient were freed at once.
        input_grads: gradients of the loss w.r.t. the model's floating-point inputs (recorded only
            for the input-norm variant with ``input_grad_source="backward"``).
        attack_input_norms: ``[B]`` per-row norms of the last attack input gradient before this pass's
            training forward (input-norm variant, ``input_grad_source="attack"``).
        weighted_rows: ``B`` when this pass's output gradients were scaled by the weights
            ``w_i`` fixed at the training forward (the input-norm fast path); ``None`` otherwise.
        estimated_norms: ``[B]`` the estimates ``s m_i`` those weights came from (fast path).
        accumulated: the pass accumulated into some ``p.grad`` (tracked on the fast path, where
            no layer call is recorded).
        unweighted: on the fast path, the pass also reached the parameters through a forward whose
            rows were not weighted (an input that requires grad, i.e. an attack-style call).
    """

    calls: Dict[nn.Module, List[LayerCall]] = field(default_factory=dict)
    per_example: Dict[nn.Module, Dict[nn.Parameter, torch.Tensor]] = field(default_factory=dict)
    input_grads: List[torch.Tensor] = field(default_factory=list)
    attack_input_norms: Optional[torch.Tensor] = None
    weighted_rows: Optional[int] = None
    estimated_norms: Optional[torch.Tensor] = None
    accumulated: bool = False
    unweighted: bool = False

    def add(self, call: LayerCall) -> None:
        """Append a completed call."""
        self.calls.setdefault(call.layer, []).append(call)

    def add_per_example(self, layer: nn.Module, grads: Dict[nn.Parameter, torch.Tensor]) -> None:
        """Add one call's ``[B, *p.shape]`` per-example gradients to the layer's running sums."""
        total = self.per_example.setdefault(layer, {})
        for p, g in grads.items():
            if p in total and total[p].shape != g.shape:
                raise batch_size_error({len(total[p]), len(g)})
            total[p] = g if p not in total else total[p] + g

    def reached(self) -> Set[nn.Parameter]:
        """The parameters this backward pass reached through recorded layer calls."""
        params = {p for calls in self.calls.values() for call in calls for p in call.params}
        return params | {p for grads in self.per_example.values() for p in grads}

    def batch_size(self) -> int:
        """The number of rows ``B`` every call of this pass saw; ``ValueError`` if they disagree."""
        sizes = {len(_first_tensor(call.activations)) for calls in self.calls.values() for call in calls}
        sizes |= {len(g) for grads in self.per_example.values() for g in grads.values()}
        sizes |= {len(g) for g in self.input_grads}
        if self.attack_input_norms is not None:
            sizes.add(len(self.attack_input_norms))
        if len(sizes) != 1:
            raise batch_size_error(sizes)
        return sizes.pop()


def batch_size_error(sizes: Set[int]) -> ValueError:
    """The error for layer calls of one backward pass that saw different numbers of rows."""
    return ValueError(
        f"The layers reached by one backward pass saw batches of different sizes {sorted(sizes)}. "
        "ENGM treats each row of the batch as one example, so every layer call that a loss depends on "
        "must see the same rows. Fix: call the model on batches of one size in one loss "
        "(e.g. TRADES: model(x) and model(x_adv) with len(x) == len(x_adv))."
    )


def _first_tensor(values: Sequence[Any]) -> torch.Tensor:
    return next(v for v in values if isinstance(v, torch.Tensor))
