"""The protocol every adversarial-training loss adapter follows.

An adapter runs its attack and returns **per-example** losses ``l_i`` (shape
``[B]``), so that ENGM can weight each example: ``w_i = 1/max(||grad l_i||, gamma)``.
A user's own AT loss plugs in by implementing :class:`ATLoss`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass
class ATLossOutput:
    """What one adapter call returns.

    Attributes:
        per_example: ``[B]`` training losses ``l_i``, differentiable w.r.t. the model's parameters.
        x_adv: ``[B, ...]`` adversarial inputs (detached).
        logits_adv: ``[B, C]`` detached logits on ``x_adv`` (robust accuracy of the batch).
        logits_clean: ``[B, C]`` detached logits on clean ``x`` when the loss computed them, else ``None``.
        attack_input_grad: ``[B, ...]`` gradient w.r.t. the input of the attack's per-example loss at
            the last PGD step, when that loss is the training loss (PGD-AT), else ``None``.
            Used by the cheap ENGM variant's ``source="attack"``.
    """

    per_example: torch.Tensor
    x_adv: torch.Tensor
    logits_adv: torch.Tensor
    logits_clean: Optional[torch.Tensor] = None
    attack_input_grad: Optional[torch.Tensor] = None


@runtime_checkable
class ATLoss(Protocol):
    """An AT method: ``adapter(model, x, y) -> ATLossOutput`` with per-example losses."""

    name: str

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> ATLossOutput: ...
