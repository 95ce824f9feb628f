"""``make_engm``: the one-line switch from momentum SGD to ENGM, shaped like Opacus's ``make_private``.

``model, optimizer = make_engm(model, optimizer, gamma=...)`` returns the model wrapped in
:class:`~engm_opacus.per_example.ENGMModule` and the optimizer wrapped in
:class:`~engm_opacus.optim.ENGMOptimizer`. The training script stays as it is:
``loss = criterion(model(x_adv), y); loss.backward(); optimizer.step(); optimizer.zero_grad()``.
There is no privacy accounting and no Poisson sampling: this is not DP.
"""

from __future__ import annotations

from typing import Literal, Optional, Tuple

import torch
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel
from opacus.grad_sample import GradSampleModule
from torch import nn

from engm_opacus.functional import validate_gamma
from engm_opacus.optim import ENGMOptimizer, InputNormEstimator, NonFinitePolicy, require_torch_optimizer
from engm_opacus.optim.distributed import skip_gradient_all_reduce
from engm_opacus.per_example import ENGMModule
from engm_opacus.per_example.module import INPUT_GRAD_SOURCES, InputGradSource

DATA_PARALLEL = (nn.parallel.DistributedDataParallel, DifferentiallyPrivateDistributedDataParallel)
"""Data-parallel wrappers ``make_engm`` accepts: ENGM then all-reduces its own sums over the ranks."""

Variant = Literal["exact", "input-norm"]
VARIANTS: Tuple[str, ...] = ("exact", "input-norm")


def make_engm(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    gamma: float,
    variant: Variant = "exact",
    loss_reduction: Literal["mean", "sum"] = "mean",
    on_nonfinite: NonFinitePolicy = "raise",
    input_norm_scale: Optional[float] = None,
    calibrate_every: int = 10,
    calibration_momentum: float = 0.5,
    input_grad_source: InputGradSource = "backward",
    attack_loss_reduction: Literal["mean", "sum"] = "mean",
) -> Tuple[ENGMModule, ENGMOptimizer]:
    """Wrap ``model`` and ``optimizer`` for ENGM.

    Per step, with ``g_i = B * dL/dtheta^(i)`` the gradient w.r.t. example ``i``'s own copy of the
    parameters in the batch computation (``= grad l_i`` without BatchNorm):
    ``d = (1/N) sum_i g_i / max(||g_i||_2, gamma)`` goes to ``optimizer`` (SGD semantics for
    weight decay, momentum, Nesterov).

    Data parallelism: pass the model already wrapped in ``DistributedDataParallel`` (or Opacus's
    ``DifferentiallyPrivateDistributedDataParallel``), as Opacus's ``make_private`` takes it. Each
    rank computes its examples' ``g_i``, norms and weights; the weighted sums and example counts are
    all-reduced, so ``d`` is the single-process direction on the global batch (uneven shards too),
    and DDP's own gradient all-reduce is skipped. BatchNorm keeps per-rank statistics, as in plain
    DDP: ``g_i`` is then ``B_r * dL_r/dtheta^(i)`` within rank ``r``'s batch of ``B_r`` rows.

    Args:
        model: the network (BatchNorm allowed), or the network wrapped in ``DistributedDataParallel``. Every trainable layer needs a per-example rule:
            Linear, Conv1d/2d/3d (any ``padding_mode``), BatchNorm1d/2d/3d, GroupNorm, and the
            layers Opacus has grad samplers for; others are refused with the list.
        optimizer: a ``torch.optim.Optimizer`` built on ``model``'s parameters.
        gamma: the normalization floor ``gamma > 0`` (this library's choice per run: no default
            is taken from the paper).
        variant: ``"exact"`` (per-example norms from the backward's records) or
            ``"input-norm"`` (``n_i ~= s * B ||dL/dx_i||``, ``s`` calibrated against exact
            norms: :class:`~engm_opacus.optim.InputNormEstimator`).
        loss_reduction: how the loss you call ``backward()`` on reduces its batch: ``"mean"``
            (``CrossEntropyLoss()``'s default, what AT code does) or ``"sum"``.
        on_nonfinite: ``"raise"`` or ``"skip"`` on NaN/inf per-example norms.
        input_norm_scale: input-norm only: a fixed ``s`` (no calibration).
        calibrate_every: input-norm only: calibrate ``s`` on the first step and every ``K`` steps.
        calibration_momentum: input-norm only: ``beta`` of the running geometric average of ``s``.
        input_grad_source: input-norm only: ``"backward"`` (the input gradient of your training
            loss, from its own backward: any loss; the weighted gradient is then computed at
            ``step()``) or ``"attack"`` (the attack's last input gradient, for attacks whose loss
            is the training loss, as in PGD-AT: the weights are fixed before the training backward,
            which then produces ``d`` itself at MSGD's cost).
        attack_loss_reduction: input-norm only: with ``input_grad_source="attack"``, how the attack's
            loss reduces its batch: ``"mean"`` (``F.cross_entropy``'s default, Rice et al.'s and
            MART's attacks) or ``"sum"`` (TRADES's KL attack, this library's ``pgd_linf``); ``m_i``
            is then each example's own input-gradient norm whatever the batch size.

    Returns:
        ``(ENGMModule, ENGMOptimizer)``: an Opacus ``GradSampleModule`` whose ``state_dict`` has
        the plain model's keys (``to_standard_module()`` gives the plain model back), and an
        Opacus ``DPOptimizer`` with :attr:`~engm_opacus.optim.ENGMOptimizer.last_step`.

    Raises:
        ValueError: bad ``gamma``, unknown ``variant`` or ``loss_reduction``, unsupported layers,
            or input-norm options with ``variant="exact"``.
        TypeError: ``optimizer`` is not a plain ``torch.optim.Optimizer``.
    """
    validate_gamma(gamma)
    require_torch_optimizer(optimizer)
    if on_nonfinite not in ("raise", "skip"):
        raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}.")
    if input_grad_source not in INPUT_GRAD_SOURCES:
        raise ValueError(f"input_grad_source must be one of {', '.join(INPUT_GRAD_SOURCES)}, got {input_grad_source!r}.")
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r}. Fix: use one of {', '.join(VARIANTS)}.")
    if loss_reduction not in ("mean", "sum") or attack_loss_reduction not in ("mean", "sum"):
        raise ValueError(
            f"loss_reduction and attack_loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}, {attack_loss_reduction!r}."
        )
    if variant == "exact" and (input_norm_scale is not None or input_grad_source != "backward"):
        raise ValueError(
            "input_norm_scale and input_grad_source apply to variant='input-norm' only. Fix: drop them, or pass "
            "variant='input-norm'."
        )
    if isinstance(model, GradSampleModule) or isinstance(getattr(model, "module", None), GradSampleModule):
        raise ValueError(
            "model is already wrapped by Opacus or make_engm. Fix: pass the plain nn.Module (its .to_standard_module()), "
            "or for data parallelism make_engm(DistributedDataParallel(model), optimizer, gamma=...)."
        )
    owned = {id(p) for p in model.parameters()}
    foreign = [i for group in optimizer.param_groups for i, p in enumerate(group["params"]) if id(p) not in owned]
    if foreign:
        raise ValueError(
            f"The optimizer holds {len(foreign)} parameters that are not the model's. Fix: build the optimizer on "
            "model.parameters() of the model you pass to make_engm."
        )
    estimator = None
    if variant == "input-norm":
        estimator = InputNormEstimator(
            scale=input_norm_scale, calibrate_every=calibrate_every, calibration_momentum=calibration_momentum
        )
    distributed = isinstance(model, DATA_PARALLEL)
    wrapped = ENGMModule(model, loss_reduction=loss_reduction, input_grad_source=None if estimator is None else input_grad_source)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        skip_gradient_all_reduce(model)
    engm = ENGMOptimizer(
        optimizer, module=wrapped, gamma=gamma, on_nonfinite=on_nonfinite, estimator=estimator,
        attack_loss_reduction=attack_loss_reduction, distributed=distributed,
    )
    return wrapped, engm
