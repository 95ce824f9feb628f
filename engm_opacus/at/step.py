"""One adversarial-training step: attack, per-example losses, backward, optimizer step.

The backward seam: an optimizer with a ``backward`` method (``ENGMOptimizer`` and its
ghost/cheap variants) receives the ``[B]`` per-example losses, as
``optimizer.backward(per_example, at_output=out)`` when its signature accepts
``at_output`` (variants that need the adapter's output, e.g. ``x_adv`` or the attack's
input gradient), else ``optimizer.backward(per_example)``. A plain ``torch.optim``
optimizer (the MSGD baseline) gets ``per_example.mean().backward()``, the reference
codebases' batch loss. An optimizer whose ``needs_input_grad`` attribute is ``True`` makes
the adapter run its training forward on a leaf ``x_adv`` (``track_input_grad=True``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from engm_opacus.losses.base import ATLoss, ATLossOutput, PerturbsWeights


@dataclass(frozen=True)
class StepMetrics:
    """What one :func:`train_step` measured on its batch.

    Attributes:
        loss: mean of the per-example training losses (before the step).
        clean_correct: correct predictions on clean ``x``, when the adapter computed clean logits, else ``None``.
        robust_correct: correct predictions on ``x_adv`` (at the weights the loss used).
        batch_size: ``B``.
    """

    loss: float
    clean_correct: Optional[int]
    robust_correct: int
    batch_size: int


def accepts_at_output(backward: object) -> bool:
    """Whether ``backward`` takes an ``at_output`` keyword (or ``**kwargs``)."""
    parameters = inspect.signature(backward).parameters.values()
    return any(p.name == "at_output" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def backward_per_example(optimizer: torch.optim.Optimizer, out: ATLossOutput) -> None:
    """Route ``out.per_example`` through the optimizer's ``backward`` seam, or mean-reduce for plain optimizers."""
    backward = getattr(optimizer, "backward", None)
    if backward is None:
        out.per_example.mean().backward()
    elif accepts_at_output(backward):
        backward(out.per_example, at_output=out)
    else:
        backward(out.per_example)


def count_correct(logits: torch.Tensor, y: torch.Tensor) -> int:
    """Number of rows whose arg-max equals the label."""
    return int((logits.argmax(dim=1) == y).sum())


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, at_loss: ATLoss, x: torch.Tensor, y: torch.Tensor
) -> StepMetrics:
    """Run ``at_loss`` on ``(x, y)``, backward, ``optimizer.step()``, ``optimizer.zero_grad()``.

    Expects cleared gradients (as the previous ``train_step`` leaves them). An adapter
    that perturbs weights (:class:`~engm_opacus.losses.base.PerturbsWeights`, i.e. AWP)
    is asked to restore them after the step, also when the step raises.
    """
    track_input_grad = bool(getattr(optimizer, "needs_input_grad", False))
    try:
        out = at_loss(model, x, y, track_input_grad=track_input_grad)
        backward_per_example(optimizer, out)
        optimizer.step()
        optimizer.zero_grad()
    finally:
        if isinstance(at_loss, PerturbsWeights):
            at_loss.restore_weights()
    return StepMetrics(
        loss=float(out.per_example.detach().mean()),
        clean_correct=None if out.logits_clean is None else count_correct(out.logits_clean, y),
        robust_correct=count_correct(out.logits_adv, y),
        batch_size=len(y),
    )
