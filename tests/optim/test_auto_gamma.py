"""``gamma="auto"``: the floor is the ``q`` quantile of the per-example norms of the last ``W`` steps
(the step's own norms on the first step), checked against per-example loops."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engm_opacus import make_engm
from engm_opacus.optim import AutoGamma

B = 8


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    generator = torch.Generator().manual_seed(seed)
    batches = [
        (torch.randn(B, 4, generator=generator, dtype=torch.float64), torch.randint(0, 3, (B,), generator=generator))
        for _ in range(4)
    ]
    return model, batches


def per_example(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    params = list(model.parameters())
    grads = [torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params) for i in range(len(x))]
    return grads, torch.stack([torch.sqrt(sum(g.square().sum() for g in gs)) for gs in grads])


@pytest.mark.parametrize(("quantile", "window"), [(0.5, 50), (0.8, 2)])
def test_floor_is_the_running_quantile_of_past_norms(quantile: float, window: int) -> None:
    model, batches = setup()
    reference = copy.deepcopy(model)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.2, momentum=0.9)
    options = {} if (quantile, window) == (0.5, 50) else {"gamma_quantile": quantile, "gamma_window": window}
    wrapped, optimizer = make_engm(model, torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9), gamma="auto", **options)
    history = []
    for step, (x, y) in enumerate(batches):
        grads, norms = per_example(reference, x, y)
        recent = torch.cat(history[-window:]) if history else norms
        gamma = float(torch.quantile(recent, quantile))
        for k, p in enumerate(reference.parameters()):
            p.grad = sum(g[k] / max(float(n), gamma) for g, n in zip(grads, norms)) / B
        reference_optimizer.step()
        history.append(norms)
        F.cross_entropy(wrapped(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        assert optimizer.last_step.gamma == pytest.approx(gamma, rel=1e-12), step
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-10, atol=1e-12)


def test_first_step_normalizes_about_half_with_the_median() -> None:
    model, batches = setup(1)
    wrapped, optimizer = make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1), gamma="auto")
    x, y = batches[0]
    F.cross_entropy(wrapped(x), y).backward()
    optimizer.step()
    assert optimizer.last_step.fraction_above_gamma == pytest.approx(0.5)


def test_input_norm_fast_path_uses_the_floor_of_past_steps() -> None:
    model, batches = setup(2)
    wrapped, optimizer = make_engm(
        model, torch.optim.SGD(model.parameters(), lr=0.1), gamma="auto", variant="input-norm", input_grad_source="attack"
    )
    seen = []
    for x, y in batches:
        x_adv = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(wrapped(x_adv), y), x_adv)
        expected = float(torch.quantile(torch.cat(seen), 0.5)) if seen else None
        F.cross_entropy(wrapped(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        if expected is not None:
            assert optimizer.last_step.gamma == pytest.approx(expected, rel=1e-12)
            torch.testing.assert_close(optimizer.last_step.weights, 1.0 / optimizer.last_step.per_example_norms.clamp(min=expected))
        seen.append(optimizer.last_step.per_example_norms)


def test_state_dict_carries_the_window_and_the_scale() -> None:
    model, batches = setup(3)
    wrapped, optimizer = make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1), gamma="auto", variant="input-norm")
    for x, y in batches[:2]:
        F.cross_entropy(wrapped(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    state = optimizer.state_dict()
    twin_model = copy.deepcopy(setup(3)[0])
    twin_model.load_state_dict(model.state_dict())
    twin, twin_optimizer = make_engm(twin_model, torch.optim.SGD(twin_model.parameters(), lr=0.1), gamma="auto", variant="input-norm")
    twin_optimizer.load_state_dict(state)
    for net, opt in ((wrapped, optimizer), (twin, twin_optimizer)):
        x, y = batches[2]
        F.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert twin_optimizer.last_step.gamma == optimizer.last_step.gamma
    assert twin_optimizer.estimator.scale == optimizer.estimator.scale
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gamma": "automatic"}, "gamma must be a positive finite number.*gamma='auto'"),
        ({"gamma": "auto", "gamma_quantile": 1.0}, r"gamma_quantile must be in \(0, 1\)"),
        ({"gamma": "auto", "gamma_window": 0}, "gamma_window must be a positive int"),
        ({"gamma": 1.0, "gamma_quantile": 0.9}, "apply to gamma='auto' only"),
    ],
)
def test_bad_auto_gamma_arguments(kwargs: dict, match: str) -> None:
    model, _ = setup()
    with pytest.raises(ValueError, match=match):
        make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_all_zero_norms_give_a_finite_floor() -> None:
    estimator = AutoGamma()
    assert estimator.value(torch.zeros(4, dtype=torch.float64)) == 1.0
