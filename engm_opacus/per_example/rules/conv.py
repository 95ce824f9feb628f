"""The ``nn.Conv{1,2,3}d`` rule, for every ``padding_mode``, groups, stride and dilation.

Example ``i``'s weight gradient is ``G_i = sum_t b_{i,t} a_{i,t}^T`` over the ``T`` output
positions, with ``a_{i,t}`` the input patch (``D = (C_in / groups) prod(kernel)`` values) and
``b_{i,t}`` the output gradient (``P = C_out / groups``), per group. Per layer, the cheaper of

* **instantiation**: every ``G_i`` at once by the ordinary weight-gradient kernel
  (``aten.convolution_backward``) with the batch folded into the groups (``B * groups`` groups),
  ``O(T P D)`` per example; the ``G_i`` then also give ``sum_i v_i G_i`` by one contraction;
* **ghost norm**: ``||G_i||^2 = sum_{t,s} (a_t . a_s)(b_t . b_s)`` from unfolded patches,
  ``O(T^2 (D + P))`` per example (deep layers, few positions); the weighted gradient is then the
  weight-gradient kernel on ``v_i * b_i``.

Non-zero ``padding_mode`` (reflect, replicate, circular) and string padding: the input is padded
explicitly as the layer pads it, and the convolution is a valid one on the padded input.
"""

from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from opacus.utils.tensor_utils import unfold3d
from torch import nn

from engm_opacus.per_example.records import LayerCall
from engm_opacus.per_example.rules.base import (
    InputOnlyRule,
    ParamTensors,
    PerExampleGrads,
    add_into,
    compute_dtype,
    register_rule,
    scaled_per_example,
    squared_row_norms,
)
from engm_opacus.per_example.rules.outer import outer_product_squared_norms, prefer_ghost

Conv = Union[nn.Conv1d, nn.Conv2d, nn.Conv3d]

INSTANTIATION_ELEMENTS = 1 << 24
"""Most elements of instantiated per-example weight gradients kept for ``weighted_grads``."""


def valid_conv_input(layer: Conv, x: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
    """``(input, padding)`` such that ``conv(input, padding=padding)`` is ``layer``'s convolution of ``x``.

    Zero integer padding stays implicit (no copy); other modes and string padding pad explicitly.
    """
    spatial = x.dim() - 2
    if layer.padding_mode == "zeros" and not isinstance(layer.padding, str):
        return x, list(layer.padding)
    padding = layer._reversed_padding_repeated_twice
    if any(padding):
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        x = F.pad(x, padding, mode=mode)
    return x, [0] * spatial


def unfolded_patches(layer: Conv, x: torch.Tensor, padding: List[int]) -> torch.Tensor:
    """``[B, C_in * prod(kernel), T]`` patches of ``x`` at the output positions."""
    spatial = x.dim() - 2
    if spatial == 3:
        return unfold3d(x, kernel_size=layer.kernel_size, padding=tuple(padding), stride=layer.stride, dilation=layer.dilation)
    if spatial == 1:
        return F.unfold(
            x.unsqueeze(2),
            kernel_size=(1, *layer.kernel_size),
            padding=(0, *padding),
            stride=(1, *layer.stride),
            dilation=(1, *layer.dilation),
        )
    return F.unfold(x, kernel_size=layer.kernel_size, padding=padding, stride=layer.stride, dilation=layer.dilation)


def weight_grad(
    layer: Conv, b: torch.Tensor, x: torch.Tensor, padding: List[int], groups: int, want_weight: bool, want_bias: bool
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The convolution's weight (and bias) gradient for output gradient ``b`` and input ``x``."""
    spatial = x.dim() - 2
    weight_shape = (b.shape[1], x.shape[1] // groups, *layer.kernel_size)
    _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        b,
        x,
        torch.empty((), dtype=x.dtype, device=x.device).expand(weight_shape),  # only its shape is read
        [b.shape[1]] if want_bias else None,
        list(layer.stride),
        padding,
        list(layer.dilation),
        False,
        [0] * spatial,
        groups,
        [False, want_weight, want_bias],
    )
    return grad_weight, grad_bias


class ConvReduction:
    """A convolution's share of one backward pass (module docstring)."""

    def __init__(self, layer: Conv, calls: List[LayerCall]):
        self.layer, self.calls, self.dtype = layer, calls, compute_dtype(layer)
        self.kept = PerExampleGrads({})

    def _inputs(self, call: LayerCall) -> Tuple[torch.Tensor, List[int]]:
        return valid_conv_input(self.layer, call.activations[0].to(self.dtype))

    def _use_ghost(self) -> bool:
        layer, b = self.layer, self.calls[0].backprops
        positions = len(self.calls) * int(b[0, 0].numel())
        d = layer.in_channels // layer.groups * int(torch.Size(layer.kernel_size).numel())
        p = layer.out_channels // layer.groups
        return prefer_ghost(positions, d, p)

    def squared_norms(self) -> ParamTensors:
        """Ghost norms or instantiated per-example gradients, whichever costs fewer operations."""
        layer, calls = self.layer, self.calls
        kept: ParamTensors = {}
        out: ParamTensors = {}
        if calls[0].reaches(layer.bias):
            n = len(calls[0].backprops)
            kept[layer.bias] = sum(c.backprops.to(self.dtype).reshape(n, layer.out_channels, -1).sum(2) for c in calls)
            out[layer.bias] = squared_row_norms(kept[layer.bias])
        if calls[0].reaches(layer.weight):
            if self._use_ghost():
                out[layer.weight] = self._ghost_squared_norms()
            else:
                grads = self._instantiate()
                out[layer.weight] = squared_row_norms(grads)
                if grads.numel() <= INSTANTIATION_ELEMENTS:
                    kept[layer.weight] = grads
        self.kept = PerExampleGrads(kept)
        return out

    def _ghost_squared_norms(self) -> torch.Tensor:
        layer, n, groups = self.layer, len(self.calls[0].backprops), self.layer.groups
        patches, grads = [], []
        for call in self.calls:
            x, padding = self._inputs(call)
            positions = int(call.backprops[0, 0].numel())
            patches.append(unfolded_patches(layer, x, padding).view(n, groups, -1, positions).transpose(2, 3))
            grads.append(call.backprops.to(self.dtype).reshape(n, groups, layer.out_channels // groups, positions).transpose(2, 3))
        a = patches[0] if len(patches) == 1 else torch.cat(patches, 2)
        b = grads[0] if len(grads) == 1 else torch.cat(grads, 2)
        return outer_product_squared_norms(a, b, ghost=True)

    def _instantiate(self) -> torch.Tensor:
        """``[B, C_out, C_in / groups, *kernel]`` per-example weight gradients, summed over calls."""
        layer, n, groups = self.layer, len(self.calls[0].backprops), self.layer.groups
        total: Optional[torch.Tensor] = None
        for call in self.calls:
            x, padding = self._inputs(call)
            b = call.backprops.to(self.dtype)
            folded, _ = weight_grad(
                layer, b.reshape(1, -1, *b.shape[2:]), x.reshape(1, -1, *x.shape[2:]), padding, n * groups, True, False
            )
            grads = folded.view(n, layer.out_channels, *folded.shape[1:])
            total = grads if total is None else total + grads
        return total

    def weighted_grads(self, factors: torch.Tensor) -> ParamTensors:
        """From the per-example gradients ``squared_norms`` kept, else the kernel on ``v_i * b_i``."""
        layer = self.layer
        out = self.kept.weighted_grads(factors)
        want_weight = self.calls[0].reaches(layer.weight) and layer.weight not in out
        want_bias = self.calls[0].reaches(layer.bias) and layer.bias not in out
        if not (want_weight or want_bias):
            return out
        for call in self.calls:
            x, padding = self._inputs(call)
            scaled = scaled_per_example(call.backprops.to(self.dtype), factors)
            grad_weight, grad_bias = weight_grad(layer, scaled, x, padding, layer.groups, want_weight, want_bias)
            add_into(out, {**({layer.weight: grad_weight} if want_weight else {}), **({layer.bias: grad_bias} if want_bias else {})})
        return out


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(InputOnlyRule):
    """Per-example norms and weighted gradient of ``nn.Conv{1,2,3}d``."""

    def reduction(self, layer: Conv, calls: List[LayerCall]) -> ConvReduction:
        """A :class:`ConvReduction` (nothing is computed until asked)."""
        return ConvReduction(layer, calls)
