"""L-infinity PGD: constraints, analytic optimum, per-example independence, input gradient, one validation, no model state."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from engm_opacus import make_engm
from engm_opacus.at import attacks
from engm_opacus.at.attacks import attack_mode, attack_objective, pgd_linf, project
from tests.helpers.naive import naive_engm_step, per_example_grads_loop
from tests.helpers.nets import groupnorm_cnn, images

EPS = 0.1
STEP = 0.03


def batch(size: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs in [0, 1] with exact 0s and 1s (so the [0, 1] clamp is active)."""
    x, y = images(size, torch.Generator().manual_seed(seed))
    x[:, :, 0, 0] = 0.0
    x[:, :, 1, 1] = 1.0
    return x, y


class LinearScore(nn.Module):
    """Two-class logits ``[<w, x>, 0]``: with label 1 the cross-entropy increases with ``<w, x>``."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = x.flatten(1) @ self.w.flatten()
        return torch.stack([score, torch.zeros_like(score)], dim=1)


class ModeRecorder(nn.Module):
    """Records ``self.training`` at each forward, then applies ``inner``."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return self.inner(x)


@pytest.mark.parametrize("loss", ["ce", "kl"])
@pytest.mark.parametrize("random_start", [True, False, "uniform", "normal"])
def test_perturbation_within_eps_and_unit_range(loss: str, random_start: object) -> None:
    model = groupnorm_cnn()
    x, y = batch()
    x_adv = pgd_linf(model, x, y, loss=loss, eps=EPS, step_size=STEP, steps=5, random_start=random_start,
                     generator=torch.Generator().manual_seed(1))
    assert float((x_adv - x).abs().max()) <= EPS * (1 + 1e-12)
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert not x_adv.requires_grad


@pytest.mark.parametrize("random_start", [True, False])
def test_linear_loss_reaches_analytic_optimum(random_start: bool) -> None:
    """max <w, x'> over the eps-ball and [0, 1] is x + eps*sign(w) clipped; 6 steps of eps/3 reach it from anywhere in the ball."""
    generator = torch.Generator().manual_seed(3)
    w = torch.randn(1, 4, 4, generator=generator, dtype=torch.float64)
    w[w.abs() < 1e-3] = 0.5
    model = LinearScore(w)
    x = torch.rand(5, 1, 4, 4, generator=generator, dtype=torch.float64)
    x[0, 0, 0] = torch.tensor([0.0, 1.0, 0.02, 0.99], dtype=torch.float64)
    y = torch.ones(5, dtype=torch.long)
    x_adv = pgd_linf(model, x, y, eps=EPS, step_size=EPS / 3, steps=6, random_start=random_start, generator=generator)
    assert torch.equal(x_adv, torch.clamp(x + EPS * torch.sign(w), 0.0, 1.0))


def test_each_example_attacked_independently_of_the_batch() -> None:
    """CE from x (the KL attack is covered row by row in the input-gradient test: its start is random)."""
    model = groupnorm_cnn()
    x, y = batch(5)
    together = pgd_linf(model, x, y, loss="ce", eps=EPS, step_size=STEP, steps=3, random_start=False)
    for i in range(len(x)):
        alone = pgd_linf(model, x[i : i + 1], y[i : i + 1], loss="ce", eps=EPS, step_size=STEP, steps=3, random_start=False)
        torch.testing.assert_close(together[i : i + 1], alone, rtol=0, atol=1e-15)


@pytest.mark.parametrize("loss", ["ce", "kl"])
def test_input_grad_is_per_example_gradient_before_last_step(loss: str) -> None:
    model = groupnorm_cnn()
    x, y = batch()
    x_before, _ = pgd_linf(model, x, y, loss=loss, eps=EPS, step_size=STEP, steps=2,
                           generator=torch.Generator().manual_seed(5), return_input_grad=True)
    x_adv, input_grad = pgd_linf(model, x, y, loss=loss, eps=EPS, step_size=STEP, steps=3,
                                 generator=torch.Generator().manual_seed(5), return_input_grad=True)
    clean_probs = torch.softmax(model(x), dim=1).detach()
    for i in range(len(x)):
        xi = x_before[i : i + 1].clone().requires_grad_(True)
        loss_i = attack_objective(model(xi), y[i : i + 1], loss, clean_probs[i : i + 1]).sum()
        (expected,) = torch.autograd.grad(loss_i, xi)
        torch.testing.assert_close(input_grad[i : i + 1], expected, rtol=1e-12, atol=1e-14)
    assert torch.equal(x_adv, project(x_before + STEP * torch.sign(input_grad), x, EPS))


def test_zero_steps_returns_projected_start_and_no_gradient() -> None:
    x, y = batch()
    x_adv, input_grad = pgd_linf(groupnorm_cnn(), x, y, steps=0, random_start=False, return_input_grad=True)
    assert torch.equal(x_adv, x) and input_grad is None


def test_same_generator_seed_same_attack() -> None:
    model = groupnorm_cnn()
    x, y = batch()
    runs = [pgd_linf(model, x, y, eps=EPS, steps=2, generator=torch.Generator().manual_seed(9)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("loss", ["ce", "kl"])
def test_attack_leaves_no_grad_and_parameters_unchanged(loss: str) -> None:
    model = groupnorm_cnn().train()
    before = copy.deepcopy(model.state_dict())
    x, y = batch()
    pgd_linf(model, x, y, loss=loss, eps=EPS, steps=3, generator=torch.Generator().manual_seed(0))
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("loss", ["ce", "kl"])
def test_attack_through_engm_model_then_training_backward_is_the_naive_engm_step(loss: str) -> None:
    """After the attack (train mode, through the wrapped model), one ``loss.backward()`` gives exactly the naive step."""
    x, y = batch()
    reference = groupnorm_cnn()
    model = copy.deepcopy(reference)
    gamma = 1.0
    wrapped, optimizer = make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), gamma=gamma)
    wrapped.train()
    x_adv = pgd_linf(wrapped, x, y, loss=loss, eps=EPS, steps=3, generator=torch.Generator().manual_seed(0))
    assert all(p.grad is None for p in model.parameters())
    F.cross_entropy(wrapped(x_adv), y).backward()
    optimizer.step()
    optimizer.zero_grad()
    per_example = per_example_grads_loop(reference, lambda m, xa, ya: F.cross_entropy(m(xa), ya), x_adv, y)
    naive_engm_step(reference, torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9), per_example, gamma)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_attack_keeps_model_mode_by_default_and_attack_mode_restores_flags() -> None:
    model = ModeRecorder(groupnorm_cnn())
    x, y = batch()
    model.train()
    pgd_linf(model, x, y, steps=2)
    assert model.modes == [True, True]
    model.inner[1].eval()  # mixed flags must come back as they were
    model.modes.clear()
    with attack_mode(model, eval_mode=True):
        pgd_linf(model, x, y, steps=2)
    assert model.modes == [False, False]
    assert model.training and not model.inner[1].training and model.inner[0].training


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"eps": 8}, r"eps must be a number in \[0, 1\].*eps=8/255"),
        ({"eps": -0.1}, r"eps must be a number in \[0, 1\]"),
        ({"eps": float("nan")}, r"eps must be a number in \[0, 1\]"),
        ({"step_size": 2.0}, r"step_size must be a number in \[0, 1\].*step_size=8/255"),
        ({"steps": -1}, r"steps must be an int >= 0.*steps=10"),
        ({"steps": 2.5}, r"steps must be an int >= 0"),
        ({"loss": "l2"}, r"Unknown attack loss 'l2'.*ce, kl"),
        ({"random_start": "gaussian"}, r"random_start must be True, False, 'uniform' or 'normal'"),
    ],
)
def test_bad_arguments_name_the_fix(kwargs: dict, match: str) -> None:
    x, y = batch()
    with pytest.raises(ValueError, match=match):
        pgd_linf(groupnorm_cnn(), x, y, **kwargs)


def test_inputs_outside_unit_range_are_refused() -> None:
    x, y = batch()
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\].*normalization inside the model"):
        pgd_linf(groupnorm_cnn(), (x - 0.5) / 0.25, y)


def test_numpy_scalars_are_accepted() -> None:
    x, y = batch()
    expected = pgd_linf(groupnorm_cnn(), x, y, eps=0.0625, step_size=0.03125, steps=2, random_start=False)
    got = pgd_linf(groupnorm_cnn(), x, y, eps=np.float32(0.0625), step_size=np.float64(0.03125), steps=np.int64(2),
                   random_start=False)
    assert torch.equal(got, expected)


def test_arguments_validated_once_per_call_with_one_host_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """One validation call per ``pgd_linf``; the only host read-back is its single ``tolist`` (none in the loop)."""
    model = groupnorm_cnn()
    x, y = batch()
    calls = []
    original = attacks.validate_attack
    monkeypatch.setattr(attacks, "validate_attack", lambda *a, **k: calls.append(1) or original(*a, **k))
    reads = []
    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        method = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _m=method, _n=name, **k: reads.append(_n) or _m(self, *a, **k))
    pgd_linf(model, x, y, loss="kl", eps=EPS, step_size=STEP, steps=4, generator=torch.Generator().manual_seed(0))
    assert calls == [1]
    assert reads == ["tolist"]
