"""ENGM's identities that do not need a naive loop per step: Opacus clipping, other optimizers, diagnostics."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from engm_opacus import make_engm
from tests.helpers.naive import gamma_between, naive_engm_step, naive_norms, per_example_grads_loop
from tests.helpers.nets import groupnorm_cnn, images


def ce(model, x, y):
    return F.cross_entropy(model(x), y)


def test_equals_opacus_clipping_without_noise_scaled_by_one_over_gamma() -> None:
    """``w_i = (1/gamma) min(1, gamma/n_i)``: ENGM's d is Opacus's noiseless clipped mean divided by gamma."""
    x, y = images(8, torch.Generator().manual_seed(0))
    reference = groupnorm_cnn()
    norms = naive_norms(per_example_grads_loop(reference, ce, x, y))
    gamma = gamma_between(norms)
    engm_model = copy.deepcopy(reference)
    wrapped, optimizer = make_engm(engm_model, torch.optim.SGD(engm_model.parameters(), lr=1.0), gamma=gamma)
    ce(wrapped, x, y).backward()
    optimizer.step()
    dp_model = GradSampleModule(copy.deepcopy(reference))
    dp = DPOptimizer(torch.optim.SGD(dp_model.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=gamma, expected_batch_size=len(x))
    ce(dp_model, x, y).backward()
    dp.step()
    # Opacus's factor min(1, C / (n_i + 1e-6)) differs from ENGM's exact min(1, C / n_i) by at most C 1e-6 / n_i^2
    # per example, and |g_ij| <= n_i: every coordinate differs by at most 1e-6 / min_i n_i.
    bound = 1e-6 / float(norms.min())
    for p, q in zip(engm_model.parameters(), dp_model.parameters()):
        assert float((p.grad - q.grad / gamma).abs().max()) <= bound
    assert max(float(q.grad.abs().max()) for q in dp_model.parameters()) > 1e3 * bound  # the bound is not vacuous


@pytest.mark.parametrize("build_optimizer", [lambda ps: torch.optim.Adam(ps, lr=1e-2), lambda ps: torch.optim.RMSprop(ps, lr=1e-2)])
def test_other_torch_optimizers_step_on_the_engm_direction(build_optimizer) -> None:
    generator = torch.Generator().manual_seed(1)
    batches = [images(6, generator) for _ in range(2)]
    reference = groupnorm_cnn()
    engm_model = copy.deepcopy(reference)
    gamma = gamma_between(naive_norms(per_example_grads_loop(reference, ce, *batches[0])))
    wrapped, optimizer = make_engm(engm_model, build_optimizer(engm_model.parameters()), gamma=gamma)
    plain = build_optimizer(reference.parameters())
    for x, y in batches:
        ce(wrapped, x, y).backward()
        optimizer.step()
        optimizer.zero_grad()
        naive_engm_step(reference, plain, per_example_grads_loop(reference, ce, x, y), gamma)
    for p, q in zip(engm_model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_step_diagnostics_describe_the_step() -> None:
    x, y = images(8, torch.Generator().manual_seed(2))
    model = groupnorm_cnn()
    norms = naive_norms(per_example_grads_loop(model, ce, x, y))
    gamma = gamma_between(norms)
    wrapped, optimizer = make_engm(model, torch.optim.SGD(model.parameters(), lr=0.0), gamma=gamma)
    ce(wrapped, x, y).backward()
    optimizer.step()
    stats = optimizer.last_step
    direction = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(stats.per_example_norms, norms, rtol=1e-10, atol=0)
    torch.testing.assert_close(stats.weights, 1.0 / norms.clamp(min=gamma), rtol=1e-12, atol=0)
    assert stats.fraction_above_gamma == pytest.approx(float((norms > gamma).double().mean()))
    assert stats.direction_norm == pytest.approx(float(direction.norm()), rel=1e-12)
    assert not stats.skipped and stats.scale is None and not stats.calibrated


def test_a_step_without_a_backward_that_reached_the_parameters_leaves_them() -> None:
    model = groupnorm_cnn()
    before = [p.detach().clone() for p in model.parameters()]
    wrapped, optimizer = make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), gamma=1.0)
    x, y = images(4, torch.Generator().manual_seed(3))
    x.requires_grad_(True)
    torch.autograd.grad(ce(wrapped, x, y), x)  # an attack only
    optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
