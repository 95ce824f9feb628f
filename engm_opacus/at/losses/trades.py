"""TRADES (Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy", ICML 2019).

.. math::

    x^{adv}_i = \\mathrm{PGD}_{KL}(x_i),\\qquad
    l_i = \\mathrm{CE}(f(x_i), y_i) + \\beta \\sum_k p_k(x_i)\\big(\\log p_k(x_i) - \\log p_k(x^{adv}_i)\\big)

with ``p = softmax(f)``. The mean of ``l_i`` is the reference code's batch loss
``F.cross_entropy(model(x), y) + beta * (1/B) * nn.KLDivLoss(size_average=False)(log_softmax(model(x_adv)), softmax(model(x)))``.
The attack maximizes the KL term from ``x + 0.001 * N(0, 1)``, as Zhang et al.'s code.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engm_opacus.attacks import attack_mode, pgd_linf
from engm_opacus.losses.base import ATLossOutput, AttackResult, AttackThenLoss, training_input


def kl_per_example(logits_clean: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """``[B]`` ``KL(softmax(logits_clean_i) || softmax(logits_adv_i))`` summed over classes (both differentiable)."""
    return F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="none").sum(dim=1)


class TRADES(AttackThenLoss):
    """Clean cross-entropy plus ``beta`` times the clean-to-adversarial KL.

    Args:
        beta: weight of the KL term (default ``6.0``, the paper's CIFAR-10 value).
        **attack_kwargs: ``eps``, ``step_size``, ``steps``, ``attack_eval_mode`` (Zhang et al.'s code
            attacks in eval mode; default ``False`` keeps the model's mode), ``generator``;
            see :class:`~engm_opacus.losses.base.AttackThenLoss`.
    """

    name = "trades"

    def __init__(self, *, beta: float = 6.0, **attack_kwargs: Any):
        super().__init__(**attack_kwargs)
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta!r}. Fix: e.g. beta=6.0 (TRADES' CIFAR-10 value).")
        self.beta = float(beta)

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> AttackResult:
        """PGD maximizing ``KL(p(x) || p(x_adv))``, clean target computed in the attack's mode."""
        with attack_mode(model, self.attack_eval_mode):
            x_adv = pgd_linf(
                model, x, y, loss="kl", eps=self.eps, step_size=self.step_size, steps=self.steps,
                random_start=True, generator=self.generator,
            )
        return AttackResult(x_adv=x_adv)

    def loss_at(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: AttackResult, *, track_input_grad: bool = False
    ) -> ATLossOutput:
        """``l_i = CE(f(x_i), y_i) + beta * KL(p(x_i) || p(x_adv_i))``."""
        logits_clean = model(x)
        x_adv = training_input(attack.x_adv, track_input_grad)
        logits_adv = model(x_adv)
        per_example = F.cross_entropy(logits_clean, y, reduction="none") + self.beta * kl_per_example(
            logits_clean, logits_adv
        )
        return ATLossOutput(
            per_example=per_example,
            x_adv=x_adv,
            logits_adv=logits_adv.detach(),
            logits_clean=logits_clean.detach(),
        )
