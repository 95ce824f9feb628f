"""PGD-AT loss (Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018).

.. math::

    x^{adv}_i = \\mathrm{PGD}_{CE}(x_i),\\qquad
    L = \\frac{1}{B}\\sum_{i=1}^{B} \\mathrm{CE}(f(x^{adv}_i), y_i)

i.e. the reference batch loss ``F.cross_entropy(model(x_adv), y)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engm_opacus.at.losses.base import ATLossOutput, AttackThenLoss


class PGDAT(AttackThenLoss):
    """Cross-entropy on PGD-CE adversarial examples (uniform random start in the eps-ball).

    See :class:`~engm_opacus.at.losses.base.AttackThenLoss` for the attack arguments.
    """

    name = "pgd-at"
    attack_loss = "ce"
    start = "uniform"
    attack_loss_is_training_loss = True

    def loss_at(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor) -> ATLossOutput:
        """``L = CE(f(x_adv), y)``, mean over the batch."""
        logits_adv = model(x_adv)
        return ATLossOutput(loss=F.cross_entropy(logits_adv, y), x_adv=x_adv.detach(), logits_adv=logits_adv.detach())
