"""Reference-style AT script pieces (attacks, mean-reduced losses) and the two step runners.

``library_step`` is what a user's script does with the wrapped model and optimizer (one plain
``loss.backward()``); ``naive_step`` runs the same attack on a copy of the model and then the
independent reference of ``tests.helpers.naive``. Nothing here imports ``engm_opacus``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from tests.helpers.naive import LossFn, PerExample, naive_engm_step

EPS = 0.1
ALPHA = 0.04
ATTACK_STEPS = 2
BETA = 6.0

Prepare = Callable[..., tuple[torch.Tensor, ...]]
"""``prepare(model, *data) -> batch``: the attack; ``batch`` is what ``loss_fn(model, *batch)`` takes."""
Probe = Callable[..., None]
Reference = Callable[..., PerExample]


# ---------------------------------------------------------------- losses (mean-reduced)
def ce_loss(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PGD-AT: ``CE(f(x_adv), y)``, mean over the batch."""
    return F.cross_entropy(model(x_adv), y)


def trades_loss(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """TRADES: ``CE(f(x), y) + beta * KL(f(x) || f(x_adv))`` with KL ``batchmean`` (two model calls)."""
    logits = model(x)
    logits_adv = model(x_adv)
    kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1), reduction="batchmean")
    return F.cross_entropy(logits, y) + BETA * kl


# ---------------------------------------------------------------- attacks
def _project(x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    return torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0.0, 1.0)


def no_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Natural training: ``x_adv = x``."""
    return x, x, y


def _pgd_autograd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    x_adv = _project(x, x + start)
    for _ in range(ATTACK_STEPS):
        x_adv = x_adv.detach().requires_grad_()
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = _project(x, x_adv.detach() + ALPHA * grad.sign())
    return x_adv.detach()


def pgd_autograd_eval(model: nn.Module, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """PGD on CE by ``torch.autograd.grad`` w.r.t. the input, model in eval mode."""
    model.eval()
    x_adv = _pgd_autograd(model, x, y, start)
    model.train()
    return x, x_adv, y


def pgd_autograd_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """PGD on CE by ``torch.autograd.grad`` w.r.t. the input, model in train mode (running statistics move)."""
    model.train()
    return x, _pgd_autograd(model, x, y, start), y


def pgd_rice_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Rice et al. style: train mode, ``delta.requires_grad_()``, ``loss.backward()``, ``delta.grad``.

    The backward reaches the parameters (``p.grad`` accumulates); the script clears it with
    ``optimizer.zero_grad()`` after the training forward (see ``library_step``).
    """
    model.train()
    delta = (_project(x, x + start) - x).detach()
    delta.requires_grad_()
    for _ in range(ATTACK_STEPS):
        loss = F.cross_entropy(model(x + delta), y)
        loss.backward()
        grad = delta.grad.detach()
        d = torch.clamp(delta.detach() + ALPHA * grad.sign(), -EPS, EPS)
        delta.data = torch.clamp(x + d, 0.0, 1.0) - x
        delta.grad.zero_()
    return x, torch.clamp(x + delta.detach(), 0.0, 1.0), y


def trades_attack_eval(model: nn.Module, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """TRADES repository style: eval mode, maximize ``KL(f(x) || f(x_adv))`` by ``autograd.grad``."""
    model.eval()
    x_adv = (x + 0.01 * start / EPS).detach()
    for _ in range(ATTACK_STEPS):
        x_adv.requires_grad_()
        kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1), reduction="sum")
        (grad,) = torch.autograd.grad(kl, [x_adv])
        x_adv = _project(x, x_adv.detach() + ALPHA * grad.sign())
    model.train()
    return x, x_adv.detach(), y


# ---------------------------------------------------------------- runners
def library_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Sequence[torch.Tensor],
    prepare: Prepare,
    loss_fn: LossFn,
    *,
    pre_forward: Callable[[nn.Module, torch.optim.Optimizer, tuple[torch.Tensor, ...]], None] | None = None,
    probe: Probe | None = None,
    zero_grad_after_forward: bool = False,
) -> torch.Tensor:
    """The user's script: attack, [pre_forward], training forward, [probe], [zero_grad], ``loss.backward()``, step."""
    batch = prepare(model, *data)
    if pre_forward is not None:
        pre_forward(model, optimizer, batch)
    model.train()
    loss = loss_fn(model, *batch)
    if probe is not None:
        probe(model, *batch)
        model.train()
    if zero_grad_after_forward:
        optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach()


def naive_step(
    model: nn.Module,
    sgd: torch.optim.Optimizer,
    data: Sequence[torch.Tensor],
    prepare: Prepare,
    loss_fn: LossFn,
    gamma: float,
    reference: Reference,
    *,
    after_forward: Probe | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same attack on the reference copy, then ``reference`` per-example gradients and the naive step.

    ``after_forward(model, *batch)`` runs after the reference's training forward (a train-mode
    probe moves BatchNorm running statistics there in the library's run too).
    """
    batch = prepare(model, *data)
    model.train()
    per_example = reference(model, loss_fn, *batch)
    if after_forward is not None:
        after_forward(model, *batch)
        model.train()
    return naive_engm_step(model, sgd, per_example, gamma)
