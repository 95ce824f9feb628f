"""Independent reference ENGM: a per-example ``torch.autograd.grad`` loop, no Opacus.

Used by the tests as the ground truth the library must match to float64 precision.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

PerExampleLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy_per_example(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[B]`` cross-entropy losses, one forward per call."""
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def naive_per_example_grads(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: PerExampleLoss = cross_entropy_per_example
) -> list[list[torch.Tensor]]:
    """Gradient of each example's loss w.r.t. trainable parameters, one example at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for i in range(len(x)):
        loss = loss_fn(model, x[i : i + 1], y[i : i + 1]).sum()
        grads.append(list(torch.autograd.grad(loss, params, allow_unused=True)))
        grads[-1] = [torch.zeros_like(p) if g is None else g for g, p in zip(grads[-1], params)]
    return grads


def naive_norms(per_example: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """``||g_i||_2`` over all parameters of each example."""
    return torch.stack([torch.sqrt(sum((g**2).sum() for g in grads)) for grads in per_example])


def naive_engm_direction(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, gamma: float, loss_fn: PerExampleLoss = cross_entropy_per_example
) -> list[torch.Tensor]:
    """``d = (1/B) sum_i g_i / max(||g_i||, gamma)`` computed from an explicit loop."""
    per_example = naive_per_example_grads(model, x, y, loss_fn)
    norms = naive_norms(per_example)
    direction = [torch.zeros_like(g) for g in per_example[0]]
    for grads, norm in zip(per_example, norms):
        weight = 1.0 / max(float(norm), gamma)
        for total, g in zip(direction, grads):
            total += weight * g
    return [total / len(x) for total in direction]


def naive_engm_step(
    model: nn.Module,
    sgd: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    gamma: float,
    loss_fn: PerExampleLoss = cross_entropy_per_example,
) -> None:
    """One ENGM step on ``model`` by the loop above, then ``sgd.step()``."""
    direction = naive_engm_direction(model, x, y, gamma, loss_fn)
    params = [p for p in model.parameters() if p.requires_grad]
    for p, d in zip(params, direction):
        p.grad = d.clone()
    sgd.step()
    sgd.zero_grad()
