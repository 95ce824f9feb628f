"""BatchNorm under ENGM: what "the gradient of example ``i``" means, and how it is computed.

Training-mode BatchNorm normalizes every example by statistics of the whole batch, so
``l_i`` depends on every example and ``grad_theta l_i`` is not a per-example quantity.
ENGM uses this definition (exact, and as cheap as one ordinary backward pass):

**Per-example gradient (the norm pass).** For every BatchNorm call ``c`` of the forward
pass, let ``mu_c`` and ``sigma2_c`` be the biased mean and variance of that call's input
over the batch and the spatial positions (what training-mode BatchNorm computes). Then

.. math::

    g_i = \\nabla_\\theta\\, l_i\\big|_{\\mu_c,\\ \\sigma^2_c\\ \\text{held constant}},
    \\qquad n_i = \\|g_i\\|_2,

i.e. each BatchNorm call acts on example ``i`` as the fixed per-channel affine map
``y = weight * (x - mu_c) / sqrt(sigma2_c + eps) + bias``. A model that calls BatchNorm
twice per example (TRADES and MART: ``f(x)`` and ``f(x_adv)``) has two calls with their
own statistics.

**Update direction (the weighted pass).** With ``w_i = 1/max(n_i, gamma)`` detached,

.. math::

    d = \\nabla_\\theta \\frac{1}{B}\\sum_i w_i\\, l_i

through ordinary training-mode BatchNorm (statistics *not* held constant). So with
``gamma >= max_i n_i`` ENGM on a BatchNorm model is exactly MSGD with ``lr / gamma``,
as it is without BatchNorm; running statistics are updated once per forward call, as
in MSGD. For models without BatchNorm both passes coincide with the textbook
``d = (1/B) sum_i w_i g_i``.

Implementation: :func:`convert_batchnorm` turns each ``nn.BatchNorm{1,2,3}d`` into its
:class:`ENGMBatchNorm2d`-style subclass in place (same parameters, buffers and
numerics; ``isinstance(m, nn.BatchNorm2d)`` still holds). Its training-mode backward
is the ordinary BatchNorm backward, except inside :func:`batch_stats_held_constant`,
where it is the held-statistics backward above. A per-example gradient rule for the
subclasses is registered with Opacus (``register_grad_sampler``), so Opacus's hooks and
ghost-norm machinery compute ``g_i`` for them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Tuple, Type

import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn
from torch.autograd.function import once_differentiable


class _BatchNormTrainingFunction(torch.autograd.Function):
    """Training-mode batch norm whose backward holds the batch statistics constant on request.

    Forward is ``torch.native_batch_norm`` (updates the running statistics in place).
    Backward reads ``module.hold_batch_stats`` when it runs: ``False`` gives
    ``native_batch_norm_backward`` (the usual gradient); ``True`` gives the gradient of
    ``weight * (x - mean) * invstd + bias`` with ``mean`` and ``invstd`` constants.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: Optional[torch.Tensor],
        bias: Optional[torch.Tensor],
        running_mean: Optional[torch.Tensor],
        running_var: Optional[torch.Tensor],
        momentum: float,
        eps: float,
        module: "_ENGMBatchNorm",
    ) -> torch.Tensor:
        out, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        ctx.module = module
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        if ctx.module.hold_batch_stats:
            grad_x, grad_weight, grad_bias = _held_stats_backward(
                grad_out, x, weight, mean, invstd, (need_x, need_weight, need_bias)
            )
        else:
            grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
                grad_out, x, weight, None, None, mean, invstd, True, ctx.eps, [need_x, need_weight, need_bias]
            )
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


def _channel_shape(x: torch.Tensor) -> List[int]:
    return [1, -1] + [1] * (x.dim() - 2)


def _held_stats_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    mean: torch.Tensor,
    invstd: torch.Tensor,
    needed: Tuple[bool, bool, bool],
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of ``weight * (x - mean) * invstd + bias`` with ``mean``, ``invstd`` constant."""
    shape = _channel_shape(x)
    reduce_dims = [0] + list(range(2, x.dim()))
    scale = invstd if weight is None else invstd * weight
    grad_x = grad_out * scale.view(shape) if needed[0] else None
    grad_weight = (grad_out * (x - mean.view(shape)) * invstd.view(shape)).sum(reduce_dims) if needed[1] else None
    grad_bias = grad_out.sum(reduce_dims) if needed[2] else None
    return grad_x, grad_weight, grad_bias


class _ENGMBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Mixin forward for the ENGM BatchNorm subclasses: same numerics, switchable backward.

    Attributes:
        hold_batch_stats: when ``True`` *at backward time*, the backward of every
            training-mode call holds that call's batch statistics constant (the ENGM norm
            pass). Set it with :func:`batch_stats_held_constant`, not by hand.
    """

    hold_batch_stats: bool = False

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Training mode: batch statistics (running statistics updated as in ``nn.BatchNorm``); eval mode: unchanged."""
        self._check_input_dim(input)
        uses_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not uses_batch_stats or not torch.is_grad_enabled():
            return super().forward(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        tracks = self.training and self.track_running_stats
        return _BatchNormTrainingFunction.apply(
            input,
            self.weight,
            self.bias,
            self.running_mean if tracks else None,
            self.running_var if tracks else None,
            momentum,
            self.eps,
            self,
        )


class ENGMBatchNorm1d(_ENGMBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose per-example gradients follow the held-statistics definition (module docs)."""


class ENGMBatchNorm2d(_ENGMBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose per-example gradients follow the held-statistics definition (module docs)."""


class ENGMBatchNorm3d(_ENGMBatchNorm, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` whose per-example gradients follow the held-statistics definition (module docs)."""


ENGM_BATCHNORM: Dict[Type[nn.Module], Type[_ENGMBatchNorm]] = {
    nn.BatchNorm1d: ENGMBatchNorm1d,
    nn.BatchNorm2d: ENGMBatchNorm2d,
    nn.BatchNorm3d: ENGMBatchNorm3d,
}


def convert_batchnorm(model: nn.Module) -> int:
    """Turn every ``nn.BatchNorm{1,2,3}d`` of ``model`` into its ENGM subclass, in place; return how many.

    Only the class changes (``module.__class__``): parameters, buffers, hyperparameters,
    ``training`` flag and any optimizer built on the parameters stay valid, and eval-mode
    and no-grad forwards are exactly ``nn.BatchNorm``'s. Already converted layers are left
    alone. ``SyncBatchNorm`` and other subclasses are not converted.
    """
    converted = 0
    for module in model.modules():
        engm_class = ENGM_BATCHNORM.get(type(module))
        if engm_class is not None:
            module.__class__ = engm_class
            converted += 1
    return converted


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` contains an (ENGM or plain) ``nn.BatchNorm{1,2,3}d``."""
    return any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())


@contextmanager
def batch_stats_held_constant(model: nn.Module) -> Iterator[None]:
    """Within this block, backward passes through ``model``'s ENGM BatchNorm layers hold batch statistics constant.

    The flag is read when the backward runs, so the same forward graph serves both the
    ENGM norm pass (inside) and the weighted pass (outside).
    """
    layers = [module for module in model.modules() if isinstance(module, _ENGMBatchNorm)]
    for layer in layers:
        layer.hold_batch_stats = True
    try:
        yield
    finally:
        for layer in layers:
            layer.hold_batch_stats = False


@register_grad_sampler([ENGMBatchNorm1d, ENGMBatchNorm2d, ENGMBatchNorm3d])
def held_stats_batchnorm_grad_sample(
    layer: _ENGMBatchNorm, activations: List[torch.Tensor], backprops: torch.Tensor
) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-example gradients of a training-mode call, with that call's batch statistics held constant.

    With ``x_hat = (x - mean) / sqrt(var + eps)`` (biased batch statistics of this call's
    input ``x``), and ``b_i`` the gradient of ``l_i`` w.r.t. the layer output:
    ``grad weight_i = sum_spatial b_i * x_hat_i = invstd * (sum_spatial b_i * x_i - mean * sum_spatial b_i)``
    and ``grad bias_i = sum_spatial b_i``; computed in that second form, by reductions, so no
    temporary of the activation's size is allocated.
    """
    x = activations[0].to(backprops.dtype)
    reduce_dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(x, dim=reduce_dims, unbiased=False)
    b = backprops.reshape(len(x), x.shape[1], -1)
    b_sum = b.sum(dim=2)
    grads: Dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight is not None and layer.weight.requires_grad:
        b_x = torch.einsum("ncs,ncs->nc", b, x.reshape(b.shape))
        grads[layer.weight] = (b_x - mean * b_sum) * torch.rsqrt(var + layer.eps)
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = b_sum
    return grads


def layers_with_unsupported_buffers(model: nn.Module) -> List[str]:
    """Names and types of trainable layers with buffers other than the ENGM BatchNorm layers.

    Buffers (e.g. running statistics) mean a layer's output can depend on state beyond
    the example; only BatchNorm's is defined for ENGM (module docs), others are refused.
    """
    return [
        f"{name or type(module).__name__} ({type(module).__name__})"
        for name, module in model.named_modules()
        if not isinstance(module, _ENGMBatchNorm)
        and any(p.requires_grad for p in module.parameters(recurse=False))
        and any(True for _ in module.buffers(recurse=False))
    ]
