"""The ``nn.Conv{1,2,3}d`` rule, for every ``padding_mode``, groups, stride and dilation.

The input is padded explicitly as the layer pads it (``F.pad`` with the layer's
``padding_mode``: zeros, reflect, replicate or circular), so the convolution is a
valid-padding one on the padded input ``a``. Unfolding ``a`` into patches of size
``D = (C_in / groups) * prod(kernel)`` at the ``T`` output positions gives the
``G_i = sum_t b_{i,t} a_{i,t}^T`` form of :mod:`~engm_opacus.per_example.rules.outer`
per group. The weighted gradient ``sum_i v_i dL/dW^(i)`` is the ordinary weight-gradient
kernel (``aten.convolution_backward``) applied to the output gradients scaled by ``v_i``.
"""

from __future__ import annotations

from typing import Any, List, Sequence, Union

import torch
import torch.nn.functional as F
from opacus.utils.tensor_utils import unfold3d
from torch import nn

from engm_opacus.per_example.records import LayerCall
from engm_opacus.per_example.rules.base import ParamTensors, compute_dtype, register_rule
from engm_opacus.per_example.rules.outer import bias_squared_norms, outer_product_squared_norms

Conv = Union[nn.Conv1d, nn.Conv2d, nn.Conv3d]


def padded_input(layer: Conv, x: torch.Tensor) -> torch.Tensor:
    """``x`` padded exactly as ``layer`` pads it before its valid-padding convolution."""
    padding = layer._reversed_padding_repeated_twice
    if not any(padding):
        return x
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    return F.pad(x, padding, mode=mode)


def unfolded_patches(layer: Conv, x: torch.Tensor) -> torch.Tensor:
    """``[B, C_in * prod(kernel), T]`` patches of the padded input ``x`` at the output positions."""
    spatial = x.dim() - 2
    if spatial == 3:
        return unfold3d(x, kernel_size=layer.kernel_size, padding=0, stride=layer.stride, dilation=layer.dilation)
    if spatial == 1:
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, *layer.kernel_size), (1, *layer.stride), (1, *layer.dilation)
    else:
        kernel, stride, dilation = layer.kernel_size, layer.stride, layer.dilation
    return F.unfold(x, kernel_size=kernel, stride=stride, dilation=dilation)


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule:
    """Per-example norms and weighted gradient of ``nn.Conv{1,2,3}d``."""

    def forward_state(self, layer: nn.Module, activations: Sequence[Any]) -> Any:
        """Nothing beyond the input."""
        return None

    def squared_norms(self, layer: Conv, calls: List[LayerCall]) -> ParamTensors:
        """Patches of all calls concatenated along positions, then the outer-product norms per group."""
        dtype = compute_dtype(layer)
        n, groups = len(calls[0].activations[0]), layer.groups
        patches, grads = [], []
        for call in calls:
            x = padded_input(layer, call.activations[0].to(dtype))
            patches.append(unfolded_patches(layer, x).view(n, groups, -1, _positions(call.backprops)).transpose(2, 3))
            grads.append(call.backprops.to(dtype).reshape(n, groups, layer.out_channels // groups, -1).transpose(2, 3))
        a, b = torch.cat(patches, 2), torch.cat(grads, 2)
        out: ParamTensors = {}
        if calls[0].reaches(layer.weight):
            out[layer.weight] = outer_product_squared_norms(a, b)
        if calls[0].reaches(layer.bias):
            out[layer.bias] = bias_squared_norms(b)
        return out

    def weighted_grads(self, layer: Conv, calls: List[LayerCall], factors: torch.Tensor) -> ParamTensors:
        """The convolution's weight-gradient kernel on ``v_i * b_i``, summed over calls."""
        dtype = compute_dtype(layer)
        out: ParamTensors = {}
        for call in calls:
            b = call.backprops.to(dtype)
            scaled = b * factors.to(dtype).view(-1, *[1] * (b.dim() - 1))
            want_weight = call.reaches(layer.weight)
            want_bias = call.reaches(layer.bias)
            x = padded_input(layer, call.activations[0].to(dtype))
            spatial = x.dim() - 2
            _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                scaled,
                x,
                layer.weight.to(dtype),
                [layer.out_channels] if want_bias else None,
                list(layer.stride),
                [0] * spatial,
                list(layer.dilation),
                False,
                [0] * spatial,
                layer.groups,
                [False, want_weight, want_bias],
            )
            grads = {}
            if want_weight:
                grads[layer.weight] = grad_weight
            if want_bias:
                grads[layer.bias] = grad_bias
            for p, g in grads.items():
                out[p] = g if p not in out else out[p] + g
        return out


def _positions(backprops: torch.Tensor) -> int:
    return int(backprops[0, 0].numel())
