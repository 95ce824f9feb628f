"""One adversarial-training step (``train_step``): AT loss, the ordinary ``loss.backward()``, ``optimizer.step()``.

.. math::

    L = \\mathrm{at\\_loss}(f_\\theta, x, y),\\qquad \\theta \\leftarrow \\mathrm{optimizer.step}(\\nabla_\\theta L)

with ``L`` the mean-reduced batch loss of the reference codebases. The optimizer is any
``torch.optim`` optimizer: plain SGD (MSGD) or the one ``make_engm`` returns, which takes its
per-example gradients from that same backward. Nothing here depends on which.

Mixed precision: with ``autocast_dtype`` the attack and the loss run under
``torch.autocast(x.device.type, dtype)`` (the backward outside it, as torch recommends); with a
``torch.amp.GradScaler`` the step is ``scaler.scale(L).backward(); scaler.step(optimizer);
scaler.update()``, so an overflow skips the step (an ENGM optimizer receives the scale through
``_step_supports_amp_scaling`` and leaves its parameters and momentum untouched).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager, Optional

import torch
from torch import nn

from engm_opacus.at.losses.base import ATLoss, PerturbsWeights


@dataclass(frozen=True)
class StepMetrics:
    """What one :func:`train_step` measured on its batch.

    Attributes:
        loss: the mean-reduced training loss ``L`` (before the step).
        clean_correct: correct predictions on clean ``x``, when the AT loss computed clean logits, else ``None``.
        robust_correct: correct predictions on ``x_adv`` (at the weights the loss used).
        batch_size: ``B``.
        skipped: the ``GradScaler`` found inf/NaN gradients and skipped the step (``False`` without a scaler).
    """

    loss: float
    clean_correct: Optional[int]
    robust_correct: int
    batch_size: int
    skipped: bool = False


def count_correct(logits: torch.Tensor, y: torch.Tensor) -> int:
    """Number of rows whose arg-max equals the label."""
    return int((logits.argmax(dim=1) == y).sum())


def autocast_context(device_type: str, dtype: Optional[torch.dtype]) -> ContextManager[object]:
    """``torch.autocast(device_type, dtype)``, or a context that does nothing when ``dtype`` is ``None``."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    at_loss: ATLoss,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    autocast_dtype: Optional[torch.dtype] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
) -> StepMetrics:
    """``out = at_loss(model, x, y)``; ``out.loss.backward()``; ``optimizer.step()``; ``optimizer.zero_grad()``.

    Expects cleared gradients (as the previous ``train_step`` leaves them). An AT loss that
    perturbs weights (:class:`~engm_opacus.at.losses.base.PerturbsWeights`, i.e. AWP) has them
    restored after the step, also when the loss, the backward or the step raises.

    Args:
        model: the network (plain or ENGM-wrapped).
        optimizer: any ``torch.optim.Optimizer`` over the model's parameters.
        at_loss: an :class:`~engm_opacus.at.losses.base.ATLoss` (e.g. ``get_at_loss("trades")``).
        x: ``[B, ...]`` clean inputs in ``[0, 1]``.
        y: ``[B]`` labels.
        autocast_dtype: run the attack and the loss under ``torch.autocast`` with this dtype
            (``torch.bfloat16`` or ``torch.float16``); ``None``: full precision.
        scaler: a ``torch.amp.GradScaler`` (for ``float16``): scaled backward, ``scaler.step``,
            ``scaler.update``; do not call ``scaler.unscale_`` on an ENGM optimizer.

    Returns:
        the batch's :class:`StepMetrics`, measured before the step.
    """
    skipped = False
    try:
        with autocast_context(x.device.type, autocast_dtype):
            out = at_loss(model, x, y)
        if scaler is None:
            out.loss.backward()
            optimizer.step()
        else:
            scale = scaler.get_scale()
            scaler.scale(out.loss).backward()
            scaler.step(optimizer)
            scaler.update()
            skipped = scaler.get_scale() < scale  # the scaler backs off exactly when it found inf/NaN
        optimizer.zero_grad()
    finally:
        if isinstance(at_loss, PerturbsWeights):
            at_loss.restore_weights()
    return StepMetrics(
        loss=float(out.loss.detach()),
        clean_correct=None if out.logits_clean is None else count_correct(out.logits_clean, y),
        robust_correct=count_correct(out.logits_adv, y),
        batch_size=len(y),
        skipped=skipped,
    )
