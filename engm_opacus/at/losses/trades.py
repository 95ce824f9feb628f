"""TRADES loss (Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy", ICML 2019).

.. math::

    x^{adv}_i = \\mathrm{PGD}_{KL}(x_i),\\qquad
    L = \\frac{1}{B}\\sum_{i=1}^{B} \\Big[\\mathrm{CE}(f(x_i), y_i)
        + \\beta \\sum_k p_k(x_i)\\big(\\log p_k(x_i) - \\log p_k(x^{adv}_i)\\big)\\Big]

with ``p = softmax(f)``: the reference code's batch loss
``F.cross_entropy(model(x), y) + beta * (1/B) * nn.KLDivLoss(size_average=False)(log_softmax(model(x_adv)), softmax(model(x)))``,
written here with ``F.kl_div(..., reduction="batchmean")`` (the same number). The attack
maximizes the KL term from ``x + 0.001 * N(0, 1)``, as Zhang et al.'s code.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engm_opacus.at.losses.base import ATLossOutput, AttackThenLoss


def trades_kl(logits_clean: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """``(1/B) sum_i KL(softmax(logits_clean_i) || softmax(logits_adv_i))`` (``batchmean``; both sides differentiable)."""
    return F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="batchmean")


class TRADES(AttackThenLoss):
    """Clean cross-entropy plus ``beta`` times the clean-to-adversarial KL (``batchmean``).

    Args:
        beta: weight of the KL term (default ``6.0``, the paper's CIFAR-10 value).
        **attack_kwargs: ``eps``, ``step_size``, ``steps``, ``attack_eval_mode`` (Zhang et al.'s code
            attacks in eval mode; default ``False`` keeps the model's mode), ``generator``;
            see :class:`~engm_opacus.at.losses.base.AttackThenLoss`.

    Raises:
        ValueError: ``beta < 0``.
    """

    name = "trades"
    attack_loss = "kl"
    start = "normal"

    def __init__(self, *, beta: float = 6.0, **attack_kwargs: Any):
        super().__init__(**attack_kwargs)
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta!r}. Fix: e.g. beta=6.0 (TRADES' CIFAR-10 value).")
        self.beta = float(beta)

    def loss_at(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor) -> ATLossOutput:
        """``L = CE(f(x), y) + beta * KL_batchmean(p(x) || p(x_adv))``."""
        logits_clean = model(x)
        logits_adv = model(x_adv)
        loss = F.cross_entropy(logits_clean, y) + self.beta * trades_kl(logits_clean, logits_adv)
        return ATLossOutput(
            loss=loss, x_adv=x_adv.detach(), logits_adv=logits_adv.detach(), logits_clean=logits_clean.detach()
        )
