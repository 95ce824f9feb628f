"""Rules for the per-channel affine normalization layers: ``nn.BatchNorm{1,2,3}d`` and ``nn.GroupNorm``.

Both compute ``y = weight * x_hat + bias`` per channel, with ``x_hat = (x - mean) * invstd`` for
statistics over a set of rows and positions, so with ``b`` the output gradient and the spatial
positions ``s`` of example ``i``:

.. math::

    dL/d\\mathrm{weight}^{(i)}_c = \\sum_s b_{i,c,s}\\, \\hat x_{i,c,s}
      = \\mathrm{invstd}\\,\\Big(\\sum_s b_{i,c,s} x_{i,c,s} - \\mathrm{mean} \\sum_s b_{i,c,s}\\Big), \\qquad
    dL/d\\mathrm{bias}^{(i)}_c = \\sum_s b_{i,c,s},

computed by reductions (no temporary of the activation's size). The statistics are the ones the
forward used, taken from its autograd node when PyTorch's native kernel ran (free), else recomputed.

**BatchNorm** (ENGM's definition of ``g_i``): ``theta^(i)`` is example ``i``'s own copy of
``weight`` and ``bias`` inside the true training-mode batch computation; the statistics are the
call's batch mean and biased variance (eval mode: the running statistics of that forward), and
``b`` is the ordinary backward's gradient, which already carries the coupling of the examples
through the batch statistics. The per-example gradients of one backward sum to its batch gradient.
**GroupNorm** normalizes each example by its own per-group statistics, so ``dL/dtheta^(i) = grad l_i / B``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
from torch import nn

from engm_opacus.per_example.records import LayerCall
from engm_opacus.per_example.rules.base import ParamTensors, PerExampleGradRule, compute_dtype, register_rule

BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

Statistics = Tuple[torch.Tensor, torch.Tensor]
"""``(mean, invstd)`` broadcastable against ``[B, C]``."""


def saved_statistics(output: torch.Tensor, node_name: str) -> Optional[Statistics]:
    """``(mean, invstd)`` that PyTorch's native normalization kernel saved for its backward, if it ran."""
    node = output.grad_fn
    if node is None or type(node).__name__ != node_name:
        return None
    return node._saved_result1.detach(), node._saved_result2.detach()


def affine_per_example_grads(layer: nn.Module, call: LayerCall, mean: torch.Tensor, invstd: torch.Tensor) -> ParamTensors:
    """``[B, C]`` weight and bias gradients ``invstd (sum_s b x - mean sum_s b)`` and ``sum_s b``."""
    dtype = compute_dtype(layer)
    x, b = call.activations[0].to(dtype), call.backprops.to(dtype)
    n, channels = x.shape[:2]
    b_flat = b.reshape(n, channels, -1)
    b_sum = b_flat.sum(2)
    grads: ParamTensors = {}
    if layer.weight is not None and call.reaches(layer.weight):
        b_x = torch.linalg.vecdot(b_flat, x.reshape(n, channels, -1), dim=2)
        grads[layer.weight] = (b_x - mean.to(dtype) * b_sum) * invstd.to(dtype)
    if call.reaches(layer.bias):
        grads[layer.bias] = b_sum
    return grads


@register_rule(*BATCHNORM_TYPES)
class BatchNormRule(PerExampleGradRule):
    """BatchNorm under the per-example-copy definition (module docstring)."""

    def forward_state(self, layer: nn.modules.batchnorm._BatchNorm, activations: Sequence[Any], output: torch.Tensor) -> Any:
        """The statistics the forward normalized with: running statistics (copied, later forwards update
        them) in eval mode; in training mode the batch statistics the kernel saved, or ``None``."""
        uses_batch_stats = layer.training or (layer.running_mean is None and layer.running_var is None)
        if not uses_batch_stats:
            return layer.running_mean.clone(), torch.rsqrt(layer.running_var + layer.eps)
        return saved_statistics(output, "NativeBatchNormBackward0")

    def per_example_grads(self, layer: nn.modules.batchnorm._BatchNorm, call: LayerCall) -> ParamTensors:
        """:func:`affine_per_example_grads` with the call's statistics."""
        stats: Optional[Statistics] = call.forward_state
        if stats is None:
            x = call.activations[0].to(compute_dtype(layer))
            var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], unbiased=False)
            stats = mean, torch.rsqrt(var + layer.eps)
        return affine_per_example_grads(layer, call, *stats)


@register_rule(nn.GroupNorm)
class GroupNormRule(PerExampleGradRule):
    """GroupNorm: each example's own per-group statistics."""

    def forward_state(self, layer: nn.GroupNorm, activations: Sequence[Any], output: torch.Tensor) -> Any:
        """The ``[B, groups]`` statistics the kernel saved, or ``None``."""
        return saved_statistics(output, "NativeGroupNormBackward0")

    def per_example_grads(self, layer: nn.GroupNorm, call: LayerCall) -> ParamTensors:
        """:func:`affine_per_example_grads` with the per-group statistics expanded to channels."""
        stats: Optional[Statistics] = call.forward_state
        x = call.activations[0].to(compute_dtype(layer))
        n, groups = len(x), layer.num_groups
        if stats is None:
            var, mean = torch.var_mean(x.reshape(n, groups, -1), dim=2, unbiased=False)
            stats = mean, torch.rsqrt(var + layer.eps)
        per_group = layer.num_channels // groups
        mean, invstd = (s.reshape(n, groups).repeat_interleave(per_group, dim=1) for s in stats)
        return affine_per_example_grads(layer, call, mean, invstd)
