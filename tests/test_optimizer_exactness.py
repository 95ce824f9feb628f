"""ENGM through Opacus equals an independent per-example autograd loop, to 1e-10 in float64."""

from __future__ import annotations

import copy

import pytest
import torch
from models import MODELS, build, inputs_for
from naive import naive_engm_step, naive_norms, naive_per_example_grads
from torch import nn

from engm_opacus import make_engm

STEPS = 3
BATCH = 6


def batches(name: str, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [inputs_for(name, BATCH, generator) for _ in range(STEPS)]


def gamma_for(model: nn.Module, x: torch.Tensor, y: torch.Tensor, where: str) -> float:
    """A gamma below, between, or above the per-example gradient norms of the first batch."""
    norms = naive_norms(naive_per_example_grads(model, x, y))
    if where == "below":
        return 0.5 * float(norms.min())
    if where == "between":
        return float(norms.median())
    return 2.0 * float(norms.max())


def sgd(model: nn.Module, nesterov: bool) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9, nesterov=nesterov, weight_decay=5e-4)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("where", ["below", "between", "above"])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_three_steps_equal_naive_loop(name: str, where: str, nesterov: bool, mode: str) -> None:
    reference = build(name)
    data = batches(name)
    gamma = gamma_for(reference, *data[0], where)
    model = copy.deepcopy(reference)
    reference_sgd = sgd(reference, nesterov)
    wrapped, optimizer = make_engm(model, sgd(model, nesterov), gamma=gamma, grad_sample_mode=mode)
    for x, y in data:
        naive_engm_step(reference, reference_sgd, x, y, gamma)
        nn.functional.cross_entropy(wrapped(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    for p_ref, p in zip(reference.parameters(), model.parameters()):
        torch.testing.assert_close(p, p_ref, rtol=0, atol=1e-10)
    fraction = optimizer.last_step.fraction_above_gamma
    assert {"below": fraction == 1.0, "above": fraction == 0.0, "between": True}[where]
