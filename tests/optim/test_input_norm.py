"""The input-norm variant: ``n_i ~= s * ||d l_i / d x_i||`` with ``s`` calibrated against exact norms."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from engm_opacus import make_engm

B = 6


def model_and_batch(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 5, generator=generator, dtype=torch.float64)
    return model, x, torch.randint(0, 3, (B,), generator=generator)


def naive(model: nn.Module, inputs: list, y: torch.Tensor):
    """Per-example parameter gradients ``g_i`` and input-gradient norms ``m_i`` of
    ``l_i = sum_k CE(model(inputs_k[i]), y_i)`` by one autograd call per example."""
    params = list(model.parameters())
    grads, input_norms = [], []
    for i in range(B):
        xs = [x[i : i + 1].clone().requires_grad_() for x in inputs]
        loss = sum(F.cross_entropy(model(x), y[i : i + 1]) for x in xs)
        *g, = torch.autograd.grad(loss, params + xs)
        grads.append(g[: len(params)])
        input_norms.append(torch.sqrt(sum(gx.square().sum() for gx in g[len(params) :])))
    return grads, torch.stack(input_norms)


def expected_params_after_step(model: nn.Module, grads: list, norms: torch.Tensor, gamma: float, lr: float) -> list:
    weights = 1.0 / norms.clamp(min=gamma)
    return [
        p.detach() - lr * sum(w * g[k] for w, g in zip(weights, grads)) / B for k, p in enumerate(model.parameters())
    ]


@pytest.mark.parametrize("calls", [1, 2])
def test_fixed_scale_uses_scaled_input_gradient_norms(calls: int) -> None:
    model, x, y = model_and_batch()
    inputs = [x, x + 0.1] if calls == 2 else [x]
    grads, input_norms = naive(model, inputs, y)
    scale, lr = 3.0, 0.1
    gamma = float((scale * input_norms).median())
    expected = expected_params_after_step(model, grads, scale * input_norms, gamma, lr)
    wrapped, optimizer = make_engm(
        model, torch.optim.SGD(model.parameters(), lr=lr), gamma=gamma, variant="input-norm", input_norm_scale=scale
    )
    sum(F.cross_entropy(wrapped(v), y) for v in inputs).backward()
    optimizer.step()
    torch.testing.assert_close(optimizer.last_step.per_example_norms, scale * input_norms, rtol=1e-12, atol=0)
    assert not optimizer.last_step.calibrated
    for p, q in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), q, rtol=1e-12, atol=1e-14)


def test_default_calibrates_on_the_first_step_and_equals_exact_engm_there() -> None:
    model, x, y = model_and_batch()
    grads, input_norms = naive(model, [x], y)
    exact = torch.stack([torch.sqrt(sum(g.square().sum() for g in gs)) for gs in grads])
    gamma = float(exact.median())
    expected = expected_params_after_step(model, grads, exact, gamma, 0.1)
    wrapped, optimizer = make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=gamma, variant="input-norm")
    F.cross_entropy(wrapped(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()
    stats = optimizer.last_step
    assert stats.calibrated and stats.scale == pytest.approx(float(torch.median(exact / input_norms)), rel=1e-12)
    torch.testing.assert_close(stats.per_example_norms, exact, rtol=1e-10, atol=0)
    for p, q in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), q, rtol=1e-12, atol=1e-14)


def test_scale_fixes_a_large_gap_between_input_and_parameter_norms() -> None:
    """Exact norms ~50x the input-gradient norms: a fixed s = 1 would never reach gamma; the calibrated one does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 40), nn.Tanh(), nn.Linear(40, 3)).double()
    with torch.no_grad():
        model[0].weight.mul_(0.02)  # small input Jacobian: parameter gradients dwarf input gradients
    _, x, y = model_and_batch()
    grads, input_norms = naive(model, [x], y)
    exact = torch.stack([torch.sqrt(sum(g.square().sum() for g in gs)) for gs in grads])
    assert float((exact / input_norms).min()) > 20
    gamma = float(exact.median())
    wrapped, optimizer = make_engm(model, torch.optim.SGD(model.parameters(), lr=0.0), gamma=gamma, variant="input-norm")
    for _ in range(2):
        F.cross_entropy(wrapped(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    second = optimizer.last_step
    assert not second.calibrated
    assert 0.0 < second.fraction_above_gamma < 1.0  # some weights below 1/gamma: the estimate reaches gamma
    torch.testing.assert_close(second.per_example_norms, second.scale * input_norms, rtol=1e-12, atol=0)
    ratio = second.per_example_norms / exact  # lr 0: the second step sees the same model and batch
    assert 0.5 <= float(ratio.median()) <= 2.0, "the stated accuracy: median estimate within 2x of the exact norms"


def test_calibration_schedule_and_geometric_running_scale() -> None:
    model, x, y = model_and_batch()
    wrapped, optimizer = make_engm(
        model, torch.optim.SGD(model.parameters(), lr=0.05), gamma=0.5, variant="input-norm", calibrate_every=3,
        calibration_momentum=0.25,
    )
    calibrated, scales = [], []
    for step in range(7):
        _, input_norms = naive(model, [x], y)
        grads, _ = naive(model, [x], y)
        exact = torch.stack([torch.sqrt(sum(g.square().sum() for g in gs)) for gs in grads])
        fitted = float(torch.median(exact / input_norms))
        before = optimizer.estimator.scale
        F.cross_entropy(wrapped(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        calibrated.append(optimizer.last_step.calibrated)
        scales.append(optimizer.last_step.scale)
        if step == 0:
            assert scales[-1] == pytest.approx(fitted, rel=1e-12)
        elif calibrated[-1]:
            assert scales[-1] == pytest.approx(math.exp(0.75 * math.log(before) + 0.25 * math.log(fitted)), rel=1e-12)
            error = float(torch.median((before * input_norms - exact).abs() / exact))
            assert optimizer.last_step.calibration_error == pytest.approx(error, rel=1e-9)
        else:
            assert scales[-1] == before
    assert calibrated == [True, False, False, True, False, False, True]


def test_drifted_estimate_warns_at_calibration() -> None:
    model, x, y = model_and_batch()
    wrapped, optimizer = make_engm(model, torch.optim.SGD(model.parameters(), lr=0.0), gamma=1.0, variant="input-norm", calibrate_every=2)
    F.cross_entropy(wrapped(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()
    optimizer.estimator.scale *= 10  # as if the model had changed a lot since the last calibration
    F.cross_entropy(wrapped(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()
    with pytest.warns(RuntimeWarning, match="had drifted.*calibrate_every"):
        F.cross_entropy(wrapped(x), y).backward()
        optimizer.step()


def test_loss_through_the_unwrapped_module_is_refused() -> None:
    model, x, y = model_and_batch()
    _, optimizer = make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=1.0, variant="input-norm", input_norm_scale=1.0)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="no input gradient.*returned by make_engm"):
        optimizer.step()


def test_attack_by_input_gradient_through_the_wrapped_model_is_not_recorded() -> None:
    model, x, y = model_and_batch()
    grads, input_norms = naive(model, [x], y)
    wrapped, optimizer = make_engm(
        model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=1.0, variant="input-norm", input_norm_scale=2.0
    )
    delta = torch.zeros_like(x, requires_grad=True)
    torch.autograd.grad(F.cross_entropy(wrapped(x + delta), y), delta)
    F.cross_entropy(wrapped(x), y).backward()
    optimizer.step()
    torch.testing.assert_close(optimizer.last_step.per_example_norms, 2.0 * input_norms, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"input_norm_scale": 0.0}, "input_norm_scale must be a positive"),
        ({"calibrate_every": 0}, "calibrate_every must be a positive int"),
        ({"calibration_momentum": 1.5}, "calibration_momentum must be in"),
    ],
)
def test_bad_input_norm_arguments(kwargs: dict, match: str) -> None:
    model, _, _ = model_and_batch()
    with pytest.raises(ValueError, match=match):
        make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=1.0, variant="input-norm", **kwargs)
