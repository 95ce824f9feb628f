"""MART loss (Wang et al., "Improving Adversarial Robustness Requires Revisiting Misclassified Examples", ICLR 2020).

With ``p = softmax(f(x))``, ``q = softmax(f(x_adv))`` and ``k_i = argmax_{k != y_i} q_{ik}``
(the largest wrong class):

.. math::

    L = \\frac{1}{B}\\sum_{i=1}^{B}\\Big[\\mathrm{CE}(f(x^{adv}_i), y_i) - \\log(1.0001 - q_{i k_i} + 10^{-12})
        + \\lambda \\Big(\\sum_k p_{ik}\\big(\\log p_{ik} - \\log(q_{ik} + 10^{-12})\\big)\\Big)(1.0000001 - p_{i y_i})\\Big]

computed as Wang et al.'s reference ``mart_loss``: ``CE(logits_adv, y) + nll_loss(log(1.0001 - q + 1e-12), k)``
plus ``lambda * (1/B) * sum(KL_rows * (1.0000001 - p_y))``. The constants ``1.0001``, ``1e-12``
and ``1.0000001`` are the reference's (the paper writes ``-log(1 - max_{k!=y} q_k)`` and ``1 - p_y``).
The attack is PGD on the cross-entropy from ``x + 0.001 * N(0, 1)``, as the reference code.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engm_opacus.at.losses.base import ATLossOutput, AttackThenLoss

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
            see :class:`~engm_opacus.at.losses.base.AttackThenLoss`.

    Raises:
        ValueError: ``lam < 0``.
    """

    name = "mart"
    attack_loss = "ce"
    start = "normal"

    def __init__(self, *, lam: float = 5.0, **attack_kwargs: Any):
        super().__init__(**attack_kwargs)
        if not lam >= 0:
            raise ValueError(f"lam must be >= 0, got {lam!r}. Fix: e.g. lam=5.0.")
        self.lam = float(lam)

    def loss_at(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor) -> ATLossOutput:
        """The mean-reduced MART loss of the module docstring."""
        logits_clean = model(x)
        logits_adv = model(x_adv)
        adv_probs = F.softmax(logits_adv, dim=1)
        wrong = largest_wrong_class(adv_probs, y)
        loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(MARGIN_OFFSET - adv_probs + LOG_EPS), wrong)
        nat_probs = F.softmax(logits_clean, dim=1)
        true_probs = nat_probs.gather(1, y.unsqueeze(1)).squeeze(1)
        kl_rows = F.kl_div(torch.log(adv_probs + LOG_EPS), nat_probs, reduction="none").sum(dim=1)
        loss_robust = (kl_rows * (WEIGHT_OFFSET - true_probs)).mean()
        return ATLossOutput(
            loss=loss_adv + self.lam * loss_robust,
            x_adv=x_adv.detach(),
            logits_adv=logits_adv.detach(),
            logits_clean=logits_clean.detach(),
        )
