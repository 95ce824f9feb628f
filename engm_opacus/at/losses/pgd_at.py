"""PGD-AT (Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018).

.. math::

    x^{adv}_i = \\mathrm{PGD}_{CE}(x_i),\\qquad l_i = \\mathrm{CE}(f(x^{adv}_i), y_i)

The mean of ``l_i`` is the reference batch loss ``F.cross_entropy(model(x_adv), y)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engm_opacus.attacks import attack_mode, pgd_linf
from engm_opacus.losses.base import ATLossOutput, AttackResult, AttackThenLoss, training_input


class PGDAT(AttackThenLoss):
    """Cross-entropy on PGD-CE adversarial examples (uniform random start in the eps-ball).

    ``attack_input_grad`` is filled: since the attack loss is the training loss, row ``i`` is
    ``grad_x CE(f(x'), y_i)`` at ``x' = x^{(K-1)}``, the PGD iterate before the last sign step
    (not at the returned ``x_adv``), computed in the attack's mode with the weights of this step.
    See :class:`~engm_opacus.losses.base.AttackThenLoss` for the attack arguments.
    """

    name = "pgd-at"

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> AttackResult:
        """PGD on the cross-entropy; also returns its last-step input gradient."""
        with attack_mode(model, self.attack_eval_mode):
            x_adv, input_grad = pgd_linf(
                model, x, y, loss="ce", eps=self.eps, step_size=self.step_size, steps=self.steps,
                random_start=True, generator=self.generator, return_input_grad=True,
            )
        return AttackResult(x_adv=x_adv, input_grad=input_grad)

    def loss_at(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: AttackResult, *, track_input_grad: bool = False
    ) -> ATLossOutput:
        """``l_i = CE(f(x_adv_i), y_i)``."""
        x_adv = training_input(attack.x_adv, track_input_grad)
        logits_adv = model(x_adv)
        return ATLossOutput(
            per_example=F.cross_entropy(logits_adv, y, reduction="none"),
            x_adv=x_adv,
            logits_adv=logits_adv.detach(),
            attack_input_grad=attack.input_grad,
        )
