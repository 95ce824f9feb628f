"""The protocol every adversarial-training loss adapter follows.

An adapter runs its attack and returns **per-example** losses ``l_i`` (shape
``[B]``), so that ENGM can weight each example: ``w_i = 1/max(||grad l_i||, gamma)``.
A user's own AT loss plugs in by implementing :class:`ATLoss` (any callable with
this signature and a ``name``); the built-in adapters derive from
:class:`AttackThenLoss`, which splits the call into :meth:`~AttackThenLoss.attack`
and :meth:`~AttackThenLoss.loss_at` so that AWP can perturb the weights in between.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional, Protocol, runtime_checkable

import torch
from torch import nn

from engm_opacus.attacks import validate_threat_model


@dataclass
class ATLossOutput:
    """What one adapter call returns.

    Attributes:
        per_example: ``[B]`` training losses ``l_i``, differentiable w.r.t. the model's parameters.
        x_adv: ``[B, ...]`` adversarial inputs. Detached, except with ``track_input_grad=True``:
            then it is the leaf (``requires_grad=True``) the training forward ran on, so that
            ``torch.autograd.grad(per_example.sum(), x_adv, retain_graph=True)`` gives each
            example's input gradient of its own training loss.
        logits_adv: ``[B, C]`` detached logits on ``x_adv`` (robust accuracy of the batch).
        logits_clean: ``[B, C]`` detached logits on clean ``x`` when the loss computed them, else ``None``.
        attack_input_grad: ``[B, ...]`` gradient w.r.t. the input of the attack's per-example loss at
            the last PGD step, when that loss is the training loss (PGD-AT), else ``None``.
            Used by the cheap ENGM variant's ``source="attack"``. See
            :func:`engm_opacus.attacks.pgd_linf` for the exact point it is taken at.
    """

    per_example: torch.Tensor
    x_adv: torch.Tensor
    logits_adv: torch.Tensor
    logits_clean: Optional[torch.Tensor] = None
    attack_input_grad: Optional[torch.Tensor] = None


@runtime_checkable
class ATLoss(Protocol):
    """An AT method: ``adapter(model, x, y, track_input_grad=False) -> ATLossOutput`` with per-example losses."""

    name: str

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, track_input_grad: bool = False
    ) -> ATLossOutput: ...


@runtime_checkable
class PerturbsWeights(Protocol):
    """An adapter that leaves the weights perturbed after its call (AWP).

    :func:`engm_opacus.step.train_step` calls :meth:`restore_weights` after
    ``optimizer.step()`` and ``optimizer.zero_grad()``.
    """

    def restore_weights(self) -> None:
        """Undo the perturbation ``v`` while keeping the step: ``W <- W_0 + (W - W_perturbed)``."""
        ...


@dataclass
class AttackResult:
    """The attack stage's output.

    Attributes:
        x_adv: ``[B, ...]`` detached adversarial inputs.
        input_grad: the attack's last-step input gradient (see ``pgd_linf``), or ``None``.
    """

    x_adv: torch.Tensor
    input_grad: Optional[torch.Tensor] = None


class AttackThenLoss(ABC):
    """Base of the built-in adapters: ``__call__ = loss_at(attack(...))``.

    Args:
        eps: L-infinity radius in ``[0, 1]`` (default ``8/255``).
        step_size: PGD step (default ``2/255``).
        steps: PGD steps (default ``10``).
        attack_eval_mode: run the attack with the model in eval mode (TRADES' and MART's
            reference code do); default ``False`` keeps the model's mode (train mode during
            training, as Madry's and Rice et al.'s PGD-AT code).
        generator: RNG of the attack's random start (global RNG when ``None``).
    """

    name: str = ""

    def __init__(
        self,
        *,
        eps: float = 8 / 255,
        step_size: float = 2 / 255,
        steps: int = 10,
        attack_eval_mode: bool = False,
        generator: Optional[torch.Generator] = None,
    ):
        validate_threat_model(eps, step_size, steps)
        self.eps = eps
        self.step_size = step_size
        self.steps = steps
        self.attack_eval_mode = attack_eval_mode
        self.generator = generator

    @abstractmethod
    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> AttackResult:
        """Craft ``x_adv`` for the method's attack loss; leaves no gradients on the model."""

    @abstractmethod
    def loss_at(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        attack: AttackResult,
        *,
        track_input_grad: bool = False,
    ) -> ATLossOutput:
        """The training forward(s) at the current weights on ``x`` and ``attack.x_adv``."""

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, track_input_grad: bool = False
    ) -> ATLossOutput:
        """Attack, then the per-example training losses at ``x_adv``."""
        return self.loss_at(model, x, y, self.attack(model, x, y), track_input_grad=track_input_grad)


def training_input(x_adv: torch.Tensor, track_input_grad: bool) -> torch.Tensor:
    """``x_adv`` detached; a fresh leaf with ``requires_grad=True`` when ``track_input_grad``."""
    x_adv = x_adv.detach()
    return x_adv.requires_grad_(True) if track_input_grad else x_adv
