"""MART (Wang et al., "Improving Adversarial Robustness Requires Revisiting Misclassified Examples", ICLR 2020).

Per example, with ``p = softmax(f(x))``, ``q = softmax(f(x_adv))`` and
``k_i = argmax_{k != y_i} q_{ik}`` (the largest wrong class):

.. math::

    l_i = \\mathrm{CE}(f(x^{adv}_i), y_i) - \\log(1.0001 - q_{i k_i} + 10^{-12})
          + \\lambda \\Big(\\sum_k p_{ik}\\big(\\log p_{ik} - \\log(q_{ik} + 10^{-12})\\big)\\Big)(1.0000001 - p_{i y_i})

The constants ``1.0001``, ``1e-12`` and ``1.0000001`` are those of Wang et al.'s
reference ``mart_loss`` (the paper writes ``-log(1 - max_{k!=y} q_k)`` and ``1 - p_y``);
the mean of ``l_i`` equals its batch loss. The attack is PGD on the cross-entropy from
``x + 0.001 * N(0, 1)``, as the reference code.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engm_opacus.attacks import attack_mode, pgd_linf
from engm_opacus.losses.base import ATLossOutput, AttackResult, AttackThenLoss, training_input

MARGIN_OFFSET = 1.0001
LOG_EPS = 1e-12
WEIGHT_OFFSET = 1.0000001


def largest_wrong_class(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[B]`` index of the largest probability among the classes other than ``y`` (reference: top-2 of argsort)."""
    top2 = torch.argsort(probs, dim=1)[:, -2:]
    return torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])


class MART(AttackThenLoss):
    """Boosted cross-entropy on ``x_adv`` plus ``lambda`` times the KL weighted by ``1 - p_y(x)``.

    Args:
        lam: weight ``lambda`` of the weighted KL term (default ``5.0``; the reference
            script calls it ``beta``).
        **attack_kwargs: ``eps``, ``step_size``, ``steps``, ``attack_eval_mode`` (Wang et al.'s code
            attacks in eval mode; default ``False`` keeps the model's mode), ``generator``;
            see :class:`~engm_opacus.losses.base.AttackThenLoss`.
    """

    name = "mart"

    def __init__(self, *, lam: float = 5.0, **attack_kwargs: Any):
        super().__init__(**attack_kwargs)
        if not lam >= 0:
            raise ValueError(f"lam must be >= 0, got {lam!r}. Fix: e.g. lam=5.0.")
        self.lam = float(lam)

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> AttackResult:
        """PGD on the cross-entropy from ``x + 0.001 * N(0, 1)``."""
        with attack_mode(model, self.attack_eval_mode):
            x_adv = pgd_linf(
                model, x, y, loss="ce", eps=self.eps, step_size=self.step_size, steps=self.steps,
                random_start="normal", generator=self.generator,
            )
        return AttackResult(x_adv=x_adv)

    def loss_at(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: AttackResult, *, track_input_grad: bool = False
    ) -> ATLossOutput:
        """The per-example MART loss of the module docstring."""
        logits_clean = model(x)
        x_adv = training_input(attack.x_adv, track_input_grad)
        logits_adv = model(x_adv)
        adv_probs = F.softmax(logits_adv, dim=1)
        wrong = largest_wrong_class(adv_probs, y).unsqueeze(1)
        boosted_ce = F.cross_entropy(logits_adv, y, reduction="none") - torch.log(
            MARGIN_OFFSET - adv_probs + LOG_EPS
        ).gather(1, wrong).squeeze(1)
        nat_probs = F.softmax(logits_clean, dim=1)
        true_probs = nat_probs.gather(1, y.unsqueeze(1)).squeeze(1)
        kl = F.kl_div(torch.log(adv_probs + LOG_EPS), nat_probs, reduction="none").sum(dim=1)
        per_example = boosted_ce + self.lam * kl * (WEIGHT_OFFSET - true_probs)
        return ATLossOutput(
            per_example=per_example,
            x_adv=x_adv,
            logits_adv=logits_adv.detach(),
            logits_clean=logits_clean.detach(),
        )
