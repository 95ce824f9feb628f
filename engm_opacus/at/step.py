"""One adversarial-training step (``train_step``): AT loss, the ordinary ``loss.backward()``, ``optimizer.step()``.

.. math::

    L = \\mathrm{at\\_loss}(f_\\theta, x, y),\\qquad \\theta \\leftarrow \\mathrm{optimizer.step}(\\nabla_\\theta L)

with ``L`` the mean-reduced batch loss of the reference codebases. The optimizer is any
``torch.optim`` optimizer: plain SGD (MSGD) or the one ``make_engm`` returns, which takes its
per-example gradients from that same backward. Nothing here depends on which.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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
    """

    loss: float
    clean_correct: Optional[int]
    robust_correct: int
    batch_size: int


def count_correct(logits: torch.Tensor, y: torch.Tensor) -> int:
    """Number of rows whose arg-max equals the label."""
    return int((logits.argmax(dim=1) == y).sum())


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, at_loss: ATLoss, x: torch.Tensor, y: torch.Tensor
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

    Returns:
        the batch's :class:`StepMetrics`, measured before the step.
    """
    try:
        out = at_loss(model, x, y)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    finally:
        if isinstance(at_loss, PerturbsWeights):
            at_loss.restore_weights()
    return StepMetrics(
        loss=float(out.loss.detach()),
        clean_correct=None if out.logits_clean is None else count_correct(out.logits_clean, y),
        robust_correct=count_correct(out.logits_adv, y),
        batch_size=len(y),
    )
