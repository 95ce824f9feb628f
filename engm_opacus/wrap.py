"""``make_engm``: the one-call wrap helper, shaped like Opacus's ``PrivacyEngine.make_private``.

``model, optimizer = make_engm(model, optimizer, gamma=...)`` returns the model
wrapped in an Opacus ``GradSampleModule`` (per-sample gradients by hooks or
functorch) and the optimizer wrapped in :class:`~engm_opacus.optimizer.ENGMOptimizer`.
The training loop is unchanged: ``loss.backward(); optimizer.step(); optimizer.zero_grad()``.
There is no privacy accounting and no Poisson sampling: this is not DP.

``variant="input-norm"`` gives the cheap variant instead (:mod:`engm_opacus.cheap`):
the model is returned unchanged and the optimizer estimates ``||g_i||`` from input gradients.
"""

from __future__ import annotations

from typing import Literal, Optional, Tuple, Union

import torch
from opacus.grad_sample import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from engm_opacus.batchnorm import convert_batchnorm, has_batchnorm, layers_with_unsupported_buffers
from engm_opacus.cheap import InputGradSource, InputNormENGMOptimizer, ScaleHook, make_input_norm_engm
from engm_opacus.ghost import TwoPassENGMOptimizer, ghost_module
from engm_opacus.grad_sample_module import ENGMGradSampleModule
from engm_opacus.optimizer import ENGMOptimizer, NonFinitePolicy, require_torch_optimizer
from engm_opacus.weights import validate_gamma

GradSampleMode = Literal["hooks", "functorch", "ghost"]
SUPPORTED_GRAD_SAMPLE_MODES: Tuple[str, ...] = ("hooks", "functorch", "ghost")


def unsupported_layers_error(model: nn.Module) -> Optional[ValueError]:
    """Return one ``ValueError`` naming every layer Opacus cannot give per-example gradients for, or ``None``.

    ``nn.BatchNorm{1,2,3}d`` is supported (see :mod:`engm_opacus.batchnorm`) once
    :func:`~engm_opacus.batchnorm.convert_batchnorm` has run; other layers with buffers are not.
    """
    errors = [str(error) for error in ModuleValidator.validate(model, strict=False)]
    errors += [f"{layer}: a trainable layer with buffers" for layer in layers_with_unsupported_buffers(model)]
    if not errors:
        return None
    listed = "\n".join(f"  - {error}" for error in errors)
    return ValueError(
        "make_engm cannot compute exact per-example gradients for this model:\n"
        f"{listed}\n"
        "Fix: model = opacus.validators.ModuleValidator.fix(model) replaces these layers by supported "
        "ones (do it before building the optimizer); or use a model without these layers."
    )


def make_engm(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    gamma: float,
    grad_sample_mode: GradSampleMode = "hooks",
    loss_reduction: Literal["mean", "sum"] = "mean",
    expected_batch_size: Optional[int] = None,
    on_nonfinite: NonFinitePolicy = "raise",
    variant: Literal["exact", "input-norm"] = "exact",
    input_norm_source: InputGradSource = "recompute",
    calibrate_every: Optional[int] = None,
    scale: Union[None, float, ScaleHook] = None,
    calibration_momentum: float = 0.9,
    calibration_examples: int = 32,
) -> Tuple[nn.Module, Union[ENGMOptimizer, InputNormENGMOptimizer]]:
    """Wrap ``model`` and ``optimizer`` for exact ENGM.

    The update per step is ``d = (1/B) sum_i g_i / max(||g_i||_2, gamma)`` handed to
    ``optimizer`` (SGD semantics for weight decay, momentum, Nesterov).

    Args:
        model: the network; must pass Opacus's ``ModuleValidator``, except that
            ``nn.BatchNorm{1,2,3}d`` is allowed with ``"hooks"`` and ``"ghost"``: it is
            converted in place (:func:`~engm_opacus.batchnorm.convert_batchnorm`) and
            ``g_i`` is defined with the batch statistics held constant; see
            :mod:`engm_opacus.batchnorm` for that definition and the update ``d``.
        optimizer: a ``torch.optim.Optimizer`` built on ``model``'s parameters.
        gamma: normalization floor ``gamma > 0``.
        grad_sample_mode: ``"hooks"`` (Opacus's per-layer rules), ``"functorch"``, or
            ``"ghost"`` (norms without per-example gradients, :mod:`engm_opacus.ghost`).
            ``"ghost"`` and BatchNorm models return a
            :class:`~engm_opacus.ghost.TwoPassENGMOptimizer`: call
            ``optimizer.backward(per_example_losses)`` instead of ``loss.backward()``.
        loss_reduction: how the loss you call ``backward()`` on reduces the batch:
            ``"mean"`` (``CrossEntropyLoss()`` default, what AT code does) or ``"sum"``.
            Either way ``g_i`` is the gradient of example ``i``'s own loss.
        expected_batch_size: see :class:`~engm_opacus.optimizer.ENGMOptimizer`.
        on_nonfinite: ``"raise"`` or ``"skip"`` on NaN/inf per-example gradients.
        variant: ``"exact"`` (per-example gradients) or ``"input-norm"`` (the cheap variant:
            returns ``(model, InputNormENGMOptimizer)`` with the model unwrapped, any model
            including BatchNorm; grad_sample_mode, loss_reduction and expected_batch_size
            do not apply). The next five arguments apply to ``"input-norm"`` only.
        input_norm_source: ``"recompute"`` or ``"attack"``; see :mod:`engm_opacus.cheap`.
        calibrate_every: calibrate the scale ``s`` every ``K`` steps against exact norms;
            ``None``: fixed ``scale``.
        scale: fixed ``s`` (default 1.0) or a hook ``scale(input_norms)``; only without calibration.
        calibration_momentum: momentum of the running average of ``s``.
        calibration_examples: examples of the batch whose exact norms a calibration computes.

    Returns:
        ``(ENGMGradSampleModule, ENGMOptimizer)``. The model is an Opacus ``GradSampleModule``
        whose hooks ignore backward passes that do not reach the parameters, so an attack
        that differentiates w.r.t. the input (in train or eval mode) can run through it.
        With ``grad_sample_mode="ghost"`` the model is a
        :class:`~engm_opacus.ghost.GhostNormModule` (same attack behaviour); with ``"ghost"``
        or a BatchNorm model the optimizer is a
        :class:`~engm_opacus.ghost.TwoPassENGMOptimizer` (an ``ENGMOptimizer``).
        With ``variant="input-norm"``: ``(model, InputNormENGMOptimizer)``, the model unwrapped.
        Every optimizer returned is an Opacus ``DPOptimizer`` subclass.

    Raises:
        ValueError: bad ``gamma``, unknown mode, or layers without per-example gradients.
        TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``.
    """
    if variant == "input-norm":
        if (grad_sample_mode, loss_reduction, expected_batch_size) != ("hooks", "mean", None):
            raise ValueError(
                "grad_sample_mode, loss_reduction and expected_batch_size apply to variant='exact' only; "
                "the input-norm variant takes per-example losses in optimizer.backward(losses, ...) and "
                "divides by the actual batch size. Fix: leave them at their defaults."
            )
        return make_input_norm_engm(
            model,
            optimizer,
            gamma=gamma,
            source=input_norm_source,
            calibrate_every=calibrate_every,
            scale=scale,
            calibration_momentum=calibration_momentum,
            calibration_examples=calibration_examples,
            on_nonfinite=on_nonfinite,
        )
    if variant != "exact":
        raise ValueError(f"Unknown variant {variant!r}. Fix: use 'exact' or 'input-norm'.")
    if (input_norm_source, calibrate_every, scale) != ("recompute", None, None):
        raise ValueError(
            "input_norm_source, calibrate_every and scale apply to variant='input-norm' only. "
            "Fix: pass variant='input-norm', or drop these arguments for exact ENGM."
        )
    validate_gamma(gamma)
    require_torch_optimizer(optimizer)
    if grad_sample_mode not in SUPPORTED_GRAD_SAMPLE_MODES:
        raise ValueError(
            f"Unknown grad_sample_mode {grad_sample_mode!r}. "
            f"Fix: use one of {', '.join(SUPPORTED_GRAD_SAMPLE_MODES)}."
        )
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}.")
    if isinstance(model, GradSampleModule):
        raise ValueError(
            "model is already a GradSampleModule. Fix: pass the plain nn.Module (its ._module)."
        )
    batchnorm = has_batchnorm(model)
    if batchnorm and grad_sample_mode == "functorch":
        raise ValueError(
            "grad_sample_mode='functorch' cannot give per-example gradients of BatchNorm layers (it "
            "differentiates one example at a time, without the batch statistics). "
            "Fix: use grad_sample_mode='hooks' or 'ghost'."
        )
    convert_batchnorm(model)
    error = unsupported_layers_error(model)
    if error is not None:
        raise error
    if grad_sample_mode == "ghost":
        wrapped_model = ghost_module(model, loss_reduction=loss_reduction)
    else:
        wrapped_model = ENGMGradSampleModule(
            model,
            batch_first=True,
            loss_reduction=loss_reduction,
            force_functorch=grad_sample_mode == "functorch",
            strict=not batchnorm,
        )
    if grad_sample_mode == "ghost" or batchnorm:
        return wrapped_model, TwoPassENGMOptimizer(
            optimizer,
            module=wrapped_model,
            gamma=gamma,
            expected_batch_size=expected_batch_size,
            on_nonfinite=on_nonfinite,
        )
    engm_optimizer = ENGMOptimizer(
        optimizer,
        gamma=gamma,
        expected_batch_size=expected_batch_size,
        on_nonfinite=on_nonfinite,
    )
    engm_optimizer.model_loss_reduction = loss_reduction
    return wrapped_model, engm_optimizer
