"""The protocol every adversarial-training loss follows, and the attack-then-loss base of the built-in ones.

An AT loss is a callable ``at_loss(model, x, y) -> ATLossOutput`` with a ``name``
(:class:`ATLoss`). Its ``loss`` is the **mean-reduced** scalar training loss, exactly as
the reference codebases compute it, e.g. for PGD-AT

.. math::

    L = \\frac{1}{B} \\sum_{i=1}^{B} \\mathrm{CE}(f(x^{adv}_i), y_i),

so that ``loss.backward()`` is the user's ordinary backward: any torch optimizer (MSGD)
steps on it, and an ENGM-wrapped model gets each example's gradient from that same
backward. A user's own AT loss plugs in by implementing :class:`ATLoss`.

The built-in adapters derive from :class:`AttackThenLoss`, which splits the call into
:meth:`~AttackThenLoss.attack` (one shared PGD call, configured by the subclass's
``attack_loss`` and ``start``) and :meth:`~AttackThenLoss.loss_at`, so that AWP can
perturb the weights in between.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Optional, Protocol, runtime_checkable

import torch
from torch import nn

from engm_opacus.at.attacks import AttackLoss, StartKind, attack_mode, pgd_linf, validate_threat_model


@dataclass
class ATLossOutput:
    """What one AT loss call returns.

    Attributes:
        loss: scalar mean-reduced training loss ``L`` (differentiable w.r.t. the model's parameters).
        x_adv: ``[B, ...]`` adversarial inputs the training forward ran on (detached).
        logits_adv: ``[B, C]`` detached logits on ``x_adv`` (robust accuracy of the batch).
        logits_clean: ``[B, C]`` detached logits on clean ``x`` when the loss computed them, else ``None``.
    """

    loss: torch.Tensor
    x_adv: torch.Tensor
    logits_adv: torch.Tensor
    logits_clean: Optional[torch.Tensor] = None


@runtime_checkable
class ATLoss(Protocol):
    """An AT method: ``at_loss(model, x, y) -> ATLossOutput`` whose ``loss`` is the mean-reduced batch loss."""

    name: str

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> ATLossOutput: ...


@runtime_checkable
class PerturbsWeights(Protocol):
    """An AT loss that leaves the weights perturbed after its call (AWP).

    :func:`engm_opacus.at.step.train_step` calls :meth:`restore_weights` after
    ``optimizer.step()`` and ``optimizer.zero_grad()``, also when they raise.
    """

    def restore_weights(self) -> None:
        """Undo the perturbation ``v`` while keeping the step: ``W <- W_0 + (W - W_perturbed)``."""
        ...


class AttackThenLoss(ABC):
    """Base of the built-in adapters: ``__call__ = loss_at(attack(...))``.

    The attack is ``pgd_linf`` maximizing the subclass's ``attack_loss`` (``"ce"`` or ``"kl"``)
    from its ``start`` (``"uniform"`` in the eps-ball, or ``x + 0.001 N(0, 1)`` for ``"normal"``).

    Args:
        eps: L-infinity radius in ``[0, 1]`` (default ``8/255``).
        step_size: PGD step (default ``2/255``).
        steps: PGD steps (default ``10``).
        attack_eval_mode: run the attack with the model in eval mode (TRADES' and MART's
            reference code do); default ``False`` keeps the model's mode (train mode during
            training, as Madry's and Rice et al.'s PGD-AT code).
        generator: RNG of the attack's random start (global RNG when ``None``).

    Raises:
        ValueError: a threat model outside ``[0, 1]`` or negative steps, at construction.
    """

    name: ClassVar[str] = ""
    attack_loss: ClassVar[AttackLoss] = "ce"
    start: ClassVar[StartKind] = "uniform"
    attack_loss_is_training_loss: ClassVar[bool] = False
    """Whether the attack maximizes the training loss itself (PGD-AT: CE at ``x_adv``), so that the attack's last input
    gradient is a gradient of the training loss (what ``make_engm(..., input_grad_source="attack")`` reuses)."""

    def __init__(
        self,
        *,
        eps: float = 8 / 255,
        step_size: float = 2 / 255,
        steps: int = 10,
        attack_eval_mode: bool = False,
        generator: Optional[torch.Generator] = None,
    ):
        validate_threat_model(eps, step_size, steps)  # fail at configuration time, not at the first batch
        self.eps = eps
        self.step_size = step_size
        self.steps = steps
        self.attack_eval_mode = attack_eval_mode
        self.generator = generator

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x_adv = pgd_linf(model, x, y)`` with this adapter's objective, start and threat model (detached)."""
        with attack_mode(model, self.attack_eval_mode):
            return pgd_linf(
                model, x, y, loss=self.attack_loss, eps=self.eps, step_size=self.step_size, steps=self.steps,
                random_start=self.start, generator=self.generator,
            )

    @abstractmethod
    def loss_at(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor) -> ATLossOutput:
        """The training forward(s) at the current weights on ``x`` and ``x_adv``: the mean-reduced loss."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> ATLossOutput:
        """Attack, then the training loss at ``x_adv``."""
        return self.loss_at(model, x, y, self.attack(model, x, y))
