"""Bad input to make_engm / ENGMOptimizer: the right error type, and a message that names the fix."""

from __future__ import annotations

import math

import pytest
import torch
from models import build, inputs_for
from torch import nn

from engm_opacus import ENGMOptimizer, make_engm


def sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


@pytest.mark.parametrize("gamma", [0.0, -1.0, math.inf, math.nan, "big", None])
def test_gamma_must_be_positive_and_finite(gamma: object) -> None:
    model = build("mlp")
    with pytest.raises(ValueError, match=r"gamma must be a positive finite number.*Fix: pass e\.g\. gamma=1\.0"):
        make_engm(model, sgd(model), gamma=gamma)
    with pytest.raises(ValueError, match="Fix:"):
        ENGMOptimizer(sgd(model), gamma=gamma)


def test_unsupported_layer_is_refused_naming_layers_and_fix() -> None:
    """BatchNorm is supported since issue 6 (tests/test_batchnorm.py); InstanceNorm with running statistics is not."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.InstanceNorm2d(4, affine=True, track_running_stats=True), nn.ReLU())
    with pytest.raises(ValueError) as error:
        make_engm(model, torch.optim.SGD(model[0].parameters(), lr=0.1), gamma=1.0)
    message = str(error.value)
    assert "InstanceNorm2d" in message and "ModuleValidator.fix" in message


@pytest.mark.parametrize("not_an_optimizer", [None, "sgd", [torch.zeros(1)]])
def test_optimizer_must_be_a_torch_optimizer(not_an_optimizer: object) -> None:
    model = build("mlp")
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer.*Fix: build it on the model's parameters"):
        make_engm(model, not_an_optimizer, gamma=1.0)


def test_already_wrapped_optimizer_is_refused() -> None:
    model = build("mlp")
    engm = ENGMOptimizer(sgd(model), gamma=1.0)
    with pytest.raises(TypeError, match="original_optimizer"):
        make_engm(model, engm, gamma=1.0)


def test_unknown_grad_sample_mode_lists_valid_ones() -> None:
    model = build("mlp")
    with pytest.raises(ValueError, match="Fix: use one of hooks, functorch"):
        make_engm(model, sgd(model), gamma=1.0, grad_sample_mode="magic")


@pytest.mark.parametrize("losses", [torch.tensor(1.0), torch.ones(3, 2), torch.ones(0)])
def test_backward_refuses_reduced_or_misshapen_losses(losses: torch.Tensor) -> None:
    model = build("mlp")
    _, optimizer = make_engm(model, sgd(model), gamma=1.0)
    with pytest.raises(ValueError, match=r"per-example losses of shape \[B\].*reduction='none'"):
        optimizer.backward(losses)


def nan_batch() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = build("mlp")
    x, y = inputs_for("mlp", 4, torch.Generator().manual_seed(0))
    x[2, 0, 0, 0] = math.nan
    return model, x, y


def test_nonfinite_gradients_raise_by_default() -> None:
    model, x, y = nan_batch()
    before = [p.detach().clone() for p in model.parameters()]
    wrapped, optimizer = make_engm(model, sgd(model), gamma=1.0)
    nn.functional.cross_entropy(wrapped(x), y).backward()
    with pytest.raises(FloatingPointError, match=r"examples \[2\].*on_nonfinite='skip'"):
        optimizer.step()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_nonfinite_gradients_skip_the_step_when_asked() -> None:
    model, x, y = nan_batch()
    before = [p.detach().clone() for p in model.parameters()]
    wrapped, optimizer = make_engm(model, sgd(model), gamma=1.0, on_nonfinite="skip")
    nn.functional.cross_entropy(wrapped(x), y).backward()
    optimizer.step()
    assert optimizer.last_step.skipped
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert optimizer.state_dict()["state"] == {}  # no momentum buffer was created from NaNs
    optimizer.zero_grad()
    x[2, 0, 0, 0] = 0.5
    nn.functional.cross_entropy(wrapped(x), y).backward()
    optimizer.step()
    assert not optimizer.last_step.skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("size", [0, -4, 2.5])
def test_expected_batch_size_must_be_a_positive_int(size: object) -> None:
    model = build("mlp")
    with pytest.raises(ValueError, match="Fix: leave it None"):
        make_engm(model, sgd(model), gamma=1.0, expected_batch_size=size)
