"""AWP: the perturbation equals Wu et al.'s proxy-model procedure, exact restore, update at w + v (MSGD and ENGM)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engm_opacus import make_engm
from engm_opacus.at.losses import AWP, PGDAT, TRADES, get_at_loss
from engm_opacus.at.losses.awp import perturbable_weights
from engm_opacus.at.step import train_step
from tests.helpers.naive import gamma_between, naive_direction, naive_norms, per_example_grads_loop
from tests.helpers.nets import groupnorm_cnn, images

GAMMA_AWP = 0.05  # larger than the default 5e-3 so that the perturbation is clearly visible
BETA = 2.0
CNN_WEIGHTS = {"0.weight", "3.weight", "7.weight"}  # conv, conv, linear of groupnorm_cnn; GroupNorm and biases skipped


def batch(size: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return images(size, torch.Generator().manual_seed(seed))


def fixed_adv(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x + 0.05 * torch.sign(torch.sin(13.0 * x + 1.0)), 0.0, 1.0)


class FixedPGDAT(PGDAT):
    """PGD-AT whose attack returns a given ``x_adv`` (to compare with hand computations)."""

    def __init__(self, x_adv: torch.Tensor):
        super().__init__()
        self.x_adv = x_adv

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.x_adv


class FixedTRADES(TRADES):
    def __init__(self, x_adv: torch.Tensor):
        super().__init__(beta=BETA)
        self.x_adv = x_adv

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.x_adv


def reference_loss(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, inner: str) -> torch.Tensor:
    """The reference codes' mean-reduced PGD-AT or TRADES (KL ``batchmean``) loss."""
    if inner == "pgd-at":
        return F.cross_entropy(model(x_adv), y)
    loss_natural = F.cross_entropy(model(x), y)
    loss_robust = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1), reduction="batchmean")
    return loss_natural + BETA * loss_robust


def reference_awp_diff(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, inner: str) -> dict:
    """Wu et al.'s ``calc_awp`` + ``perturb``: one SGD step on a proxy for minus the loss, rescaled per weight."""
    proxy = copy.deepcopy(model)
    proxy_optim = torch.optim.SGD(proxy.parameters(), lr=0.01)
    loss = -1.0 * reference_loss(proxy, x, x_adv, y, inner)
    proxy_optim.zero_grad()
    loss.backward()
    proxy_optim.step()
    diff = {}
    for (old_k, old_w), (_, new_w) in zip(model.state_dict().items(), proxy.state_dict().items()):
        if len(old_w.size()) <= 1:
            continue
        if "weight" in old_k:
            diff_w = new_w - old_w
            diff[old_k] = GAMMA_AWP * old_w.norm() / (diff_w.norm() + 1e-20) * diff_w
    return diff


def perturbed_copy(model: nn.Module, diff: dict) -> nn.Module:
    """A copy of ``model`` with ``diff`` added to its state."""
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        state = perturbed.state_dict()
        for name, v in diff.items():
            state[name].add_(v)
    return perturbed


@pytest.mark.parametrize("inner", ["pgd-at", "trades"])
def test_perturbation_equals_reference_proxy_procedure(inner: str) -> None:
    model = groupnorm_cnn()
    x, y = batch()
    x_adv = fixed_adv(x)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    expected = reference_awp_diff(model, x, y, x_adv, inner)
    adapter = FixedPGDAT(x_adv) if inner == "pgd-at" else FixedTRADES(x_adv)
    awp = AWP(adapter, gamma_awp=GAMMA_AWP)
    out = awp(model, x, y)
    assert set(expected) == CNN_WEIGHTS
    for name, value in model.state_dict().items():
        if name in expected:
            torch.testing.assert_close(value - original[name], expected[name], rtol=1e-8, atol=1e-15)
            assert float(expected[name].norm()) > 1e-3 * float(original[name].norm())
        else:
            assert torch.equal(value, original[name]), name
    perturbed = copy.deepcopy(model)
    torch.testing.assert_close(out.loss, adapter.loss_at(perturbed, x, y, x_adv).loss, rtol=0, atol=0)
    awp.restore_weights()
    for name, value in model.state_dict().items():
        assert torch.equal(value, original[name]), name


def test_default_gamma_awp_is_wu_et_al() -> None:
    assert AWP(PGDAT()).gamma_awp == 5e-3


def test_attack_runs_at_unperturbed_weights() -> None:
    model = groupnorm_cnn()
    x, y = batch()
    expected = PGDAT(steps=2, generator=torch.Generator().manual_seed(3)).attack(model, x, y)
    awp = AWP(PGDAT(steps=2, generator=torch.Generator().manual_seed(3)), gamma_awp=GAMMA_AWP)
    out = awp(model, x, y)
    awp.restore_weights()
    assert torch.equal(out.x_adv, expected)


@pytest.mark.parametrize("use_engm", [False, True])
def test_weights_restored_exactly_when_the_step_does_not_move_them(use_engm: bool) -> None:
    model = groupnorm_cnn()
    original = [p.detach().clone() for p in model.parameters()]
    sgd = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=5e-4)
    wrapped, optimizer = make_engm(model, sgd, gamma=0.5) if use_engm else (model, sgd)
    x, y = batch()
    awp = get_at_loss("awp-pgd-at", gamma_awp=GAMMA_AWP, steps=2)
    for _ in range(2):
        train_step(wrapped, optimizer, awp, x, y)
    for p, q in zip(model.parameters(), original):
        assert torch.equal(p, q)


@pytest.mark.parametrize("inner", ["pgd-at", "trades"])
def test_msgd_update_is_gradient_at_perturbed_weights_applied_to_w(inner: str) -> None:
    model = groupnorm_cnn()
    x, y = batch()
    x_adv = fixed_adv(x)
    adapter = FixedPGDAT(x_adv) if inner == "pgd-at" else FixedTRADES(x_adv)
    perturbed = perturbed_copy(model, reference_awp_diff(model, x, y, x_adv, inner))
    grads = torch.autograd.grad(reference_loss(perturbed, x, x_adv, y, inner), list(perturbed.parameters()))
    lr = 0.3
    expected = [p.detach() - lr * g for p, g in zip(model.parameters(), grads)]
    train_step(model, torch.optim.SGD(model.parameters(), lr=lr), AWP(adapter, gamma_awp=GAMMA_AWP), x, y)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("inner", ["pgd-at", "trades"])
def test_engm_update_uses_per_example_gradients_at_perturbed_weights(inner: str) -> None:
    """ENGM's ``d`` from the naive per-example loop at ``w + v`` (gamma between the norms), applied to ``w``."""
    model = groupnorm_cnn()
    x, y = batch()
    x_adv = fixed_adv(x)
    lr = 0.3
    perturbed = perturbed_copy(model, reference_awp_diff(model, x, y, x_adv, inner))
    per_example = per_example_grads_loop(perturbed, lambda m, *rows: reference_loss(m, *rows, inner), x, x_adv, y)
    gamma = gamma_between(naive_norms(per_example))
    direction, _, _ = naive_direction(per_example, gamma)
    expected = [p.detach() - lr * d for p, d in zip(model.parameters(), direction)]
    wrapped, optimizer = make_engm(model, torch.optim.SGD(model.parameters(), lr=lr), gamma=gamma)
    adapter = FixedPGDAT(x_adv) if inner == "pgd-at" else FixedTRADES(x_adv)
    train_step(wrapped, optimizer, AWP(adapter, gamma_awp=GAMMA_AWP), x, y)
    assert 0.0 < optimizer.last_step.fraction_above_gamma < 1.0  # some examples normalized, some not
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-9, atol=1e-12)


def test_ascent_leaves_no_grads() -> None:
    model = groupnorm_cnn()
    x, y = batch()
    awp = get_at_loss("awp-trades", gamma_awp=GAMMA_AWP, steps=1)
    awp(model, x, y)
    assert all(p.grad is None for p in model.parameters())
    awp.restore_weights()


def test_ascent_leaves_batchnorm_statistics_untouched() -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3)).double().train()
    x, y = batch()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    awp = AWP(FixedPGDAT(fixed_adv(x)), gamma_awp=GAMMA_AWP)
    perturbation = awp.weight_perturbation(model, x, y, fixed_adv(x))
    assert [w for w, _ in perturbation] == perturbable_weights(model)
    for name, value in model.named_buffers():
        assert torch.equal(value, buffers[name]), name


def test_perturbable_weights_are_multi_dim_weights_only() -> None:
    model = groupnorm_cnn()
    assert perturbable_weights(model) == [model[0].weight, model[3].weight, model[7].weight]


def test_second_call_without_restore_is_refused_and_restore_is_idempotent() -> None:
    model = groupnorm_cnn()
    original = [p.detach().clone() for p in model.parameters()]
    x, y = batch()
    awp = AWP(FixedPGDAT(fixed_adv(x)), gamma_awp=GAMMA_AWP)
    awp(model, x, y)
    with pytest.raises(RuntimeError, match=r"still AWP-perturbed.*restore_weights\(\)"):
        awp(model, x, y)
    awp.restore_weights()
    awp.restore_weights()
    for p, q in zip(model.parameters(), original):
        assert torch.equal(p, q)


def test_bad_awp_arguments_name_the_fix() -> None:
    with pytest.raises(ValueError, match=r"gamma_awp must be a number >= 0.*5e-3"):
        AWP(PGDAT(), gamma_awp=-1.0)
    with pytest.raises(TypeError, match=r"AWP wraps an AttackThenLoss.*get_at_loss\('awp-pgd-at'\)"):
        AWP(lambda model, x, y: None)
