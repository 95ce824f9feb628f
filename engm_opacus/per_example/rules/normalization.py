"""Rules for the per-channel affine normalization layers: ``nn.BatchNorm{1,2,3}d`` and ``nn.GroupNorm``.

Both compute ``y = weight * x_hat + bias`` per channel, so with ``b`` the output gradient and the
spatial positions ``s`` of example ``i``:

.. math::

    dL/d\\mathrm{weight}^{(i)}_c = \\sum_s b_{i,c,s}\\, \\hat x_{i,c,s}, \\qquad
    dL/d\\mathrm{bias}^{(i)}_c = \\sum_s b_{i,c,s}.

**BatchNorm** (ENGM's definition of ``g_i``): ``theta^(i)`` is example ``i``'s own copy of
``weight`` and ``bias`` inside the true training-mode batch computation; ``x_hat`` uses the
call's batch mean and biased variance (eval mode: the running statistics of that forward), and
``b`` is the ordinary backward's gradient, which already carries the coupling of the examples
through the batch statistics. The per-example gradients of one backward sum to its batch gradient.
**GroupNorm** normalizes each example by its own statistics, so ``dL/dtheta^(i) = grad l_i / B``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from engm_opacus.per_example.records import LayerCall
from engm_opacus.per_example.rules.base import ParamTensors, PerExampleGradRule, compute_dtype, register_rule

BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def affine_per_example_grads(layer: nn.Module, call: LayerCall, x_hat_terms: Tuple[torch.Tensor, torch.Tensor]) -> ParamTensors:
    """``[B, C]`` weight and bias gradients from ``sum_s b * x_hat`` and ``sum_s b`` (given as ``x_hat_terms``)."""
    b_x_hat, b_sum = x_hat_terms
    grads: ParamTensors = {}
    if layer.weight is not None and call.reaches(layer.weight):
        grads[layer.weight] = b_x_hat
    if call.reaches(layer.bias):
        grads[layer.bias] = b_sum
    return grads


@register_rule(*BATCHNORM_TYPES)
class BatchNormRule(PerExampleGradRule):
    """BatchNorm under the per-example-copy definition (module docstring)."""

    def forward_state(self, layer: nn.modules.batchnorm._BatchNorm, activations: Sequence[Any]) -> Any:
        """The running statistics an eval-mode forward normalized with (copied: later forwards update them)."""
        uses_batch_stats = layer.training or (layer.running_mean is None and layer.running_var is None)
        return None if uses_batch_stats else (layer.running_mean.clone(), layer.running_var.clone())

    def per_example_grads(self, layer: nn.modules.batchnorm._BatchNorm, call: LayerCall) -> ParamTensors:
        """``sum_s b (x - mean) invstd`` computed as ``invstd * (sum_s b x - mean sum_s b)``: reductions only."""
        dtype = compute_dtype(layer)
        x, b = call.activations[0].to(dtype), call.backprops.to(dtype)
        n, channels = x.shape[:2]
        stats: Optional[Tuple[torch.Tensor, torch.Tensor]] = call.forward_state
        if stats is None:
            var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], unbiased=False)
        else:
            mean, var = (s.to(dtype) for s in stats)
        b_flat, x_flat = b.reshape(n, channels, -1), x.reshape(n, channels, -1)
        b_sum = b_flat.sum(2)
        b_x_hat = (torch.einsum("ncs,ncs->nc", b_flat, x_flat) - mean * b_sum) * torch.rsqrt(var + layer.eps)
        return affine_per_example_grads(layer, call, (b_x_hat, b_sum))


@register_rule(nn.GroupNorm)
class GroupNormRule(PerExampleGradRule):
    """GroupNorm: ``x_hat`` from each example's own group statistics."""

    def per_example_grads(self, layer: nn.GroupNorm, call: LayerCall) -> ParamTensors:
        """``sum_s b * x_hat`` with ``x_hat = F.group_norm(x)`` (no affine), and ``sum_s b``."""
        dtype = compute_dtype(layer)
        x, b = call.activations[0].to(dtype), call.backprops.to(dtype)
        n, channels = x.shape[:2]
        x_hat = F.group_norm(x, layer.num_groups, eps=layer.eps).reshape(n, channels, -1)
        b_flat = b.reshape(n, channels, -1)
        return affine_per_example_grads(layer, call, (torch.einsum("ncs,ncs->nc", b_flat, x_hat), b_flat.sum(2)))
