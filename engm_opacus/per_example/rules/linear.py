"""The ``nn.Linear`` rule: ghost or instantiated norms, and the weighted gradient as one matrix product.

For inputs ``a`` of shape ``[B, ..., in]`` and output gradients ``b`` of shape ``[B, ..., out]``:
``dL/dW^(i) = sum_t b_{i,t} a_{i,t}^T``, ``dL/dbias^(i) = sum_t b_{i,t}``, and

.. math::

    \\sum_i v_i\\, dL/dW^{(i)} = (v \\odot b)^T a

(the weight-gradient product of an ordinary backward, with ``b`` scaled per example).
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from engm_opacus.per_example.records import LayerCall
from engm_opacus.per_example.rules.base import InputOnlyRule, ParamTensors, add_into, compute_dtype, register_rule, scaled_per_example
from engm_opacus.per_example.rules.outer import bias_squared_norms, outer_product_squared_norms, prefer_ghost


class LinearReduction:
    """``nn.Linear``'s share of one backward pass."""

    def __init__(self, layer: nn.Linear, calls: List[LayerCall]):
        self.layer, self.calls, self.dtype = layer, calls, compute_dtype(layer)

    def squared_norms(self) -> ParamTensors:
        """Positions of all calls concatenated, then :func:`outer_product_squared_norms`."""
        layer, calls, dtype = self.layer, self.calls, self.dtype
        n = len(calls[0].backprops)
        a = torch.cat([c.activations[0].to(dtype).reshape(n, -1, layer.in_features) for c in calls], 1).unsqueeze(1)
        b = torch.cat([c.backprops.to(dtype).reshape(n, -1, layer.out_features) for c in calls], 1).unsqueeze(1)
        out: ParamTensors = {}
        if calls[0].reaches(layer.weight):
            out[layer.weight] = outer_product_squared_norms(
                a, b, ghost=prefer_ghost(a.shape[2], layer.in_features, layer.out_features)
            )
        if calls[0].reaches(layer.bias):
            out[layer.bias] = bias_squared_norms(b)
        return out

    def weighted_grads(self, factors: torch.Tensor) -> ParamTensors:
        """``(v * b)^T a`` summed over calls; bias ``sum (v * b)``."""
        layer, dtype = self.layer, self.dtype
        out: ParamTensors = {}
        for call in self.calls:
            scaled = scaled_per_example(call.backprops.to(dtype), factors).reshape(-1, layer.out_features)
            grads = {}
            if call.reaches(layer.weight):
                grads[layer.weight] = scaled.T @ call.activations[0].to(dtype).reshape(-1, layer.in_features)
            if call.reaches(layer.bias):
                grads[layer.bias] = scaled.sum(0)
            add_into(out, grads)
        return out


@register_rule(nn.Linear)
class LinearRule(InputOnlyRule):
    """Per-example norms and weighted gradient of ``nn.Linear``."""

    def reduction(self, layer: nn.Linear, calls: List[LayerCall]) -> LinearReduction:
        """A :class:`LinearReduction` (nothing is computed until asked)."""
        return LinearReduction(layer, calls)
