"""Exact ENGM in two backward passes: ghost norms (Opacus fast gradient clipping) and BatchNorm models.

Opacus's fast gradient clipping backpropagates twice: once to get per-example gradient
norms ``n_i`` without materializing the per-example gradients (ghost norms), then the
per-example losses scaled by the clip factor ``min(1, C/(n_i + 1e-6))``. ENGM is that
scheme with the factor replaced by ``w_i = 1/max(n_i, gamma)``
(:func:`engm_opacus.weights.engm_weights`), no noise, and the mean over the batch:

1. norm pass: backward of the reduced loss (mean or sum, as the module expects) with
   Opacus's hooks on and BatchNorm statistics held constant
   (:func:`engm_opacus.batchnorm.batch_stats_held_constant`) -> ``n_i``; with ghost norms
   it differentiates w.r.t. the model's inputs only, so no parameter gradient is computed;
2. weighted pass: backward of ``sum_i w_i l_i`` (``w_i`` detached) with hooks off and
   ordinary BatchNorm, so ``p.grad = sum_i w_i grad l_i``; ``step()`` divides by the
   number of examples ``N`` and runs the wrapped optimizer (no noise, no second
   rescaling).

The same two passes serve BatchNorm models with materialized per-example gradients
(Opacus ``GradSampleModule`` hooks): there the norm pass stores ``p.grad_sample``, which
is reduced to ``n_i`` and freed at once.
"""

from __future__ import annotations

from collections import ChainMap
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Literal, Optional, Union

import torch
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.group_norm import compute_group_norm_grad_sample
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.utils.module_utils import trainable_parameters
from torch import nn

from engm_opacus.batchnorm import batch_stats_held_constant
from engm_opacus.grad_sample_module import SkipsInputOnlyBackward
from engm_opacus.optimizer import ENGMOptimizer, NonFinitePolicy, require_per_example_losses
from engm_opacus.per_example_norms import norms_from_grad_samples
from engm_opacus.weights import engm_weights

NormModule = Union[GradSampleModule, GradSampleModuleFastGradientClipping]
NormSampler = Callable[[nn.Module, List[torch.Tensor], torch.Tensor], Dict[nn.Parameter, torch.Tensor]]

CHUNK_ELEMENTS = 1 << 16
"""Floor of the per-chunk budget of :func:`conv2d_norm_sample` (elements); the budget is the larger of this and the layer's input size."""


def conv2d_norm_sample(layer: nn.Conv2d, activations: List[torch.Tensor], backprops: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-example gradient norms of an ``nn.Conv2d``, without the whole batch's per-example gradients.

    With ``a_t`` the unfolded input patch (``D = C_in k_h k_w``) and ``b_t`` the output
    gradient (``p = C_out``) at output position ``t`` (``T`` positions), the weight gradient
    of example ``i`` is ``G_i = sum_t b_t a_t^T``, so

    ``||G_i||_F^2 = sum_{t,s} (a_t . a_s)(b_t . b_s)`` (the ghost norm, cost ``O(T^2 (D + p))``)
    or ``||G_i||_F^2`` from ``G_i`` itself (cost ``O(p D T)``),

    whichever is cheaper for the layer (``T^2 <= p D``: ghost norm, the deep layers of a
    ResNet; else ``G_i``, the early ones), computed in batch chunks so that no intermediate
    is larger than the layer's input ``x`` (or :data:`CHUNK_ELEMENTS` elements, if more): the
    extra memory is about one activation of one layer at a time. Bias: ``||sum_t b_t||``. Grouped,
    string-padded (``"same"``) and non-zero-padded convolutions use Opacus's per-example
    gradients (``compute_conv_grad_sample``) instead.
    """
    x = activations[0].to(backprops.dtype)
    if layer.groups != 1 or isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        grads = compute_conv_grad_sample(layer, activations, backprops)
        return {p: g.flatten(1).norm(dim=1) for p, g in grads.items()}
    batch, out_channels = backprops.shape[:2]
    positions = backprops[0, 0].numel()
    patch = x.shape[1] * layer.kernel_size[0] * layer.kernel_size[1]
    ghost = positions * positions <= out_channels * patch
    largest = max(patch * positions, positions * positions if ghost else out_channels * patch)
    chunk = max(1, min(batch, max(CHUNK_ELEMENTS, x.numel()) // largest))
    weight_sq, bias_sq = [], []
    for start in range(0, batch, chunk):
        a = nn.functional.unfold(
            x[start : start + chunk], layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride
        )  # [b, D, T]
        g = backprops[start : start + chunk].flatten(2)  # [b, p, T]
        if ghost:
            weight_sq.append((a.transpose(1, 2) @ a).mul_(g.transpose(1, 2) @ g).sum(dim=(1, 2)))
        else:
            weight_sq.append((g @ a.transpose(1, 2)).pow_(2).sum(dim=(1, 2)))
        bias_sq.append(g.sum(dim=2).pow_(2).sum(dim=1))
    norms: Dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        norms[layer.weight] = torch.cat(weight_sq).clamp_(min=0).sqrt_()
    if layer.bias is not None and layer.bias.requires_grad:
        norms[layer.bias] = torch.cat(bias_sq).sqrt_()
    return norms


def group_norm_norm_sample(
    layer: nn.GroupNorm, activations: List[torch.Tensor], backprops: torch.Tensor
) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-example gradient norms of an ``nn.GroupNorm``: Opacus's per-example gradients, in batch chunks.

    GroupNorm normalizes each example by its own statistics, so chunks of the batch give
    the same per-example gradients; a chunk's temporaries are about an eighth of the layer's
    input (or :data:`CHUNK_ELEMENTS` elements, if more) instead of twice the whole input.
    """
    x = activations[0]
    chunk = max(1, max(CHUNK_ELEMENTS, x.numel() // 8) // max(1, x[0].numel()))
    norms: Dict[nn.Parameter, List[torch.Tensor]] = {}
    for start in range(0, len(x), chunk):
        grads = compute_group_norm_grad_sample(layer, [x[start : start + chunk]], backprops[start : start + chunk])
        for p, g in grads.items():
            norms.setdefault(p, []).append(g.norm(dim=1))
    return {p: torch.cat(parts) for p, parts in norms.items()}


class GhostNormModule(SkipsInputOnlyBackward, GradSampleModuleFastGradientClipping):
    """Opacus's ghost-norm module, extended to layers called more than once per example.

    Like :class:`~engm_opacus.grad_sample_module.ENGMGradSampleModule`, its hooks ignore
    backward passes that do not reach the parameters (an attack's input gradients).

    Opacus refuses ghost norms when a layer runs twice before its backward
    (``NotImplementedError: Parameter tying is not supported``), because its norm
    samplers see one call at a time and ``||g_a + g_b|| != ||g_a|| + ||g_b||``. TRADES and
    MART call the model on ``x`` and on ``x_adv``, so every layer runs twice. Here such a
    layer's calls take Opacus's own fast-gradient-clipping route instead: its per-layer
    per-example gradients of all calls are summed (``_current_grad_sample``) and reduced
    to a norm when the last call's backward arrives, then freed. Layers called once keep
    the ghost norm. The result is the exact norm of the per-example gradient summed over
    calls; tied parameters are handled the same way. ``nn.Conv2d`` layers called once
    get :func:`conv2d_norm_sample` (Opacus 1.6 has no conv norm sampler and would
    materialize the whole batch's per-example gradients of the layer).

    The norm pass needs each layer's output gradient, not the parameter gradients. So
    that it does not compute them, training-mode forwards with hooks on make their
    floating-point inputs autograd leaves (``x.detach().requires_grad_()``, values
    unchanged) and the norm pass differentiates w.r.t. those leaves only
    (:meth:`norm_pass_targets`).
    """

    NORM_SAMPLERS = ChainMap(
        {nn.Conv2d: conv2d_norm_sample, nn.GroupNorm: group_norm_norm_sample},
        GradSampleModuleFastGradientClipping.NORM_SAMPLERS,
    )
    """Opacus's norm samplers (``register_norm_sampler`` still adds to them), :func:`conv2d_norm_sample`, :func:`group_norm_norm_sample`."""

    _norm_pass_active: bool = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped module's forward; in training forwards with hooks on, float inputs become norm-pass targets."""
        if self.hooks_enabled and self.training and torch.is_grad_enabled():
            args = tuple(self._as_target(a) for a in args)
        return super().forward(*args, **kwargs)

    def _as_target(self, value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return value
        target = value if value.requires_grad else value.detach().requires_grad_(True)
        self.__dict__.setdefault("_targets", []).append(target)
        return target

    def norm_pass_targets(self) -> List[torch.Tensor]:
        """Take the input tensors recorded since the last call (the norm pass differentiates w.r.t. them)."""
        return self.__dict__.pop("_targets", [])

    @contextmanager
    def norm_pass(self) -> Iterator[None]:
        """Inside, every backward hook computes norms (no check that the pass reaches the parameters)."""
        self._norm_pass_active = True
        try:
            yield
        finally:
            self._norm_pass_active = False

    def capture_activations_hook(self, module: nn.Module, forward_input: List[torch.Tensor], forward_output: torch.Tensor) -> None:
        """Opacus's activation capture, without its refusal of a second call (handled in backward)."""
        with _ghost_norms_off(self):
            super().capture_activations_hook(module, forward_input, forward_output)

    def capture_backprops_hook(
        self,
        module: nn.Module,
        _forward_input: torch.Tensor,
        forward_output: torch.Tensor,
        loss_reduction: str,
        batch_first: bool,
    ) -> None:
        """Ghost norm for single-call layers; summed per-layer gradients for layers with several calls."""
        if self._norm_pass_active:  # targets the inputs, not the parameters: skip SkipsInputOnlyBackward's test
            hook = partial(GradSampleModuleFastGradientClipping.capture_backprops_hook, self)
        else:
            hook = super().capture_backprops_hook
        several_calls = any(
            p._forward_counter > 1 or hasattr(p, "_current_grad_sample") for _, p in trainable_parameters(module)
        )
        with _ghost_norms_off(self) if several_calls else nullcontext():
            hook(module, _forward_input, forward_output, loss_reduction, batch_first)


@contextmanager
def _ghost_norms_off(module: GradSampleModuleFastGradientClipping) -> Iterator[None]:
    ghost = module.use_ghost_clipping
    module.use_ghost_clipping = False
    try:
        yield
    finally:
        module.use_ghost_clipping = ghost


@contextmanager
def hooks_disabled(module: NormModule) -> Iterator[None]:
    """Turn the Opacus hooks of ``module`` off inside the block (e.g. for an attack's forward/backward)."""
    enabled = module.hooks_enabled
    module.disable_hooks()
    try:
        yield
    finally:
        if enabled:
            module.enable_hooks()


class TwoPassENGMOptimizer(ENGMOptimizer, DPOptimizerFastGradientClipping):
    """ENGM by a norm pass and a weighted pass; used for ``grad_sample_mode="ghost"`` and BatchNorm models.

    Call :meth:`backward` with the ``[B]`` per-example losses (``loss.backward()`` on a
    reduced loss cannot tell examples apart here). After one or more ``backward`` calls,
    ``step()`` sets ``p.grad = (1/N) sum_i w_i grad l_i`` (``N``: examples since the last
    ``zero_grad()``, or ``expected_batch_size`` per ``backward`` call) and runs the wrapped
    optimizer with its own momentum, weight decay and Nesterov. :attr:`last_step` holds
    the same :class:`~engm_opacus.optimizer.ENGMStepStats` as :class:`ENGMOptimizer`.

    Args:
        optimizer: the wrapped ``torch.optim.Optimizer``.
        module: the model wrapped by Opacus: :class:`GhostNormModule` (ghost norms) or
            ``GradSampleModule`` (hooks; per-example gradients materialized, then reduced
            to norms and freed).
        gamma: the normalization floor ``gamma > 0``.
        expected_batch_size: optional fixed divisor per ``backward`` call.
        on_nonfinite: ``"raise"`` (``FloatingPointError`` before the weighted pass) or
            ``"skip"`` (the step leaves parameters and momentum untouched).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        module: NormModule,
        gamma: float,
        expected_batch_size: Optional[int] = None,
        on_nonfinite: NonFinitePolicy = "raise",
    ):
        if not isinstance(module, (GradSampleModule, GradSampleModuleFastGradientClipping)):
            raise TypeError(
                f"module must be the Opacus-wrapped model, got {type(module).__name__}. "
                "Fix: use make_engm(model, optimizer, gamma=..., grad_sample_mode='ghost'), which wraps both."
            )
        super().__init__(optimizer, gamma=gamma, expected_batch_size=expected_batch_size, on_nonfinite=on_nonfinite)
        self.module = module
        self.model_loss_reduction = module.loss_reduction
        self._backward_calls = 0

    @property
    def accumulated_iterations(self) -> int:
        """Number of :meth:`backward` calls since the last ``zero_grad()``."""
        return self._backward_calls

    def backward(self, per_example_losses: torch.Tensor, **_: Any) -> None:
        """Norm pass, then weighted pass; ``p.grad`` accumulates ``sum_i w_i grad l_i``.

        Args:
            per_example_losses: ``[B]`` losses ``l_i`` of one forward (any AT loss:
                PGD-AT, TRADES, MART), differentiable w.r.t. the model's parameters.
            **_: other keywords of the training step's ``backward`` seam, ignored.

        Raises:
            ValueError: ``per_example_losses`` is not ``[B]``.
            FloatingPointError: a norm is NaN/inf and ``on_nonfinite="raise"``.
        """
        losses = require_per_example_losses(per_example_losses)
        norms = self._norm_pass(losses)
        if len(norms) != len(losses):
            raise ValueError(
                f"The model saw batches of {len(norms)} examples but {len(losses)} per-example losses were "
                "passed. Fix: pass one loss per example of the batch the model was called on."
            )
        if not bool(torch.isfinite(norms).all()) and self.on_nonfinite == "raise":
            bad = torch.nonzero(~torch.isfinite(norms)).flatten().tolist()
            raise FloatingPointError(
                f"Non-finite per-example gradient norm for examples {bad[:10]} of {len(norms)}. "
                "Fix: lower the learning rate or check the loss for log(0)/overflow; or pass "
                "on_nonfinite='skip' to make_engm to skip such steps."
            )
        weights = engm_weights(norms, self.gamma).to(device=losses.device, dtype=losses.dtype)
        with hooks_disabled(self.module):
            (weights * losses).sum().backward(inputs=self.params)
        self._step_norms.append(norms)
        self._accumulated_examples += len(norms)
        self._backward_calls += 1

    def _norm_pass(self, losses: torch.Tensor) -> torch.Tensor:
        """``[B]`` norms of the held-statistics per-example gradients over the optimizer's parameters."""
        reduced = losses.mean() if self.model_loss_reduction == "mean" else losses.sum()
        targets = self.module.norm_pass_targets() if isinstance(self.module, GhostNormModule) else []
        if targets:
            with batch_stats_held_constant(self.module), self.module.norm_pass():
                torch.autograd.grad(reduced, targets, retain_graph=True, allow_unused=True)
            return self._norms_from_module()
        accumulated = [p.grad for p in self.params]  # earlier weighted passes; the norm pass's grads are dropped
        for p in self.params:
            p.grad = None
        with batch_stats_held_constant(self.module):
            reduced.backward(retain_graph=True, inputs=self.params)
        for p, grad in zip(self.params, accumulated):
            p.grad = grad
        return self._norms_from_module()

    def _norms_from_module(self) -> torch.Tensor:
        if isinstance(self.module, GradSampleModuleFastGradientClipping):
            per_parameter = [self._take(p, "_norm_sample", index) for index, p in enumerate(self.params)]
            return torch.stack([n.to(per_parameter[0].device) for n in per_parameter], dim=1).norm(dim=1).detach()
        grad_samples = [self._take(p, "grad_sample", index) for index, p in enumerate(self.params)]
        return norms_from_grad_samples(grad_samples).detach()

    @staticmethod
    def _take(p: torch.Tensor, attribute: str, index: int) -> torch.Tensor:
        value = getattr(p, attribute, None)
        setattr(p, attribute, None)
        if not isinstance(value, torch.Tensor):
            raise RuntimeError(
                f"Parameter {index} of the optimizer ({tuple(p.shape)}) got no per-example gradient in the norm "
                "pass. Fix: every parameter the optimizer trains must be used in the forward pass that produced "
                "the losses, in training mode, with the model returned by make_engm (not the original module)."
            )
        return value

    def pre_step(self, closure: Optional[Any] = None) -> bool:
        """Refuse a step without :meth:`backward`; else weight, average and record as :class:`ENGMOptimizer`."""
        if not self._step_norms:
            raise RuntimeError(
                "step() found no per-example losses: with grad_sample_mode='ghost' or a BatchNorm model, "
                "ENGM needs both backward passes. Fix: call optimizer.backward(per_example_losses) "
                "(losses with reduction='none') instead of loss.backward()."
            )
        return super().pre_step(closure)

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Clear ``p.grad``, the accumulated ENGM sums and the backward-call count."""
        if not self._is_last_step_skipped:
            self._backward_calls = 0
        super().zero_grad(set_to_none)


def ghost_module(model: nn.Module, *, loss_reduction: Literal["mean", "sum"]) -> GhostNormModule:
    """Wrap ``model`` for ghost norms (BatchNorm buffers allowed: see :mod:`engm_opacus.batchnorm`)."""
    return GhostNormModule(model, batch_first=True, loss_reduction=loss_reduction, strict=False, use_ghost_clipping=True)
