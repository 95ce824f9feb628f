"""AT losses: mean-reduced loss == the reference codebases' batch loss == mean of per-example losses; attack; registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engm_opacus.at.attacks import pgd_linf
from engm_opacus.at.losses import AT_METHODS, AWP, MART, PGDAT, TRADES, ATLoss, get_at_loss
from tests.at.test_attacks import ModeRecorder
from tests.helpers.nets import groupnorm_cnn, images

EPS = 0.1
STEP = 0.03


def batch(size: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return images(size, torch.Generator().manual_seed(seed))


def reference_pgd_at(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    """Madry et al. / Rice et al.: ``F.cross_entropy(model(x_adv), y)``."""
    return F.cross_entropy(model(x_adv), y)


def reference_trades(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, beta: float) -> torch.Tensor:
    """Zhang et al.'s ``trades_loss`` after the attack (``KLDivLoss(size_average=False)`` is ``reduction='sum'``)."""
    criterion_kl = nn.KLDivLoss(reduction="sum")
    batch_size = len(x)
    logits = model(x)
    loss_natural = F.cross_entropy(logits, y)
    loss_robust = (1.0 / batch_size) * criterion_kl(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1))
    return loss_natural + beta * loss_robust


def reference_mart(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, beta: float) -> torch.Tensor:
    """Wang et al.'s ``mart_loss`` after the attack."""
    kl = nn.KLDivLoss(reduction="none")
    batch_size = len(x)
    logits = model(x)
    logits_adv = model(x_adv)
    adv_probs = F.softmax(logits_adv, dim=1)
    tmp1 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
    nat_probs = F.softmax(logits, dim=1)
    true_probs = torch.gather(nat_probs, 1, (y.unsqueeze(1)).long()).squeeze()
    loss_robust = (1.0 / batch_size) * torch.sum(
        torch.sum(kl(torch.log(adv_probs + 1e-12), nat_probs), dim=1) * (1.0000001 - true_probs)
    )
    return loss_adv + float(beta) * loss_robust


CASES = {
    "pgd-at": (lambda: PGDAT(eps=EPS, step_size=STEP, steps=3), reference_pgd_at),
    "trades": (lambda: TRADES(beta=2.5, eps=EPS, step_size=STEP, steps=3), lambda m, x, y, xa: reference_trades(m, x, y, xa, 2.5)),
    "mart": (lambda: MART(lam=3.5, eps=EPS, step_size=STEP, steps=3), lambda m, x, y, xa: reference_mart(m, x, y, xa, 3.5)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_loss_is_reference_batch_loss_with_same_gradient(name: str) -> None:
    make_adapter, reference = CASES[name]
    model = groupnorm_cnn()
    x, y = batch()
    adapter = make_adapter()
    x_adv = adapter.attack(model, x, y)
    out = adapter.loss_at(model, x, y, x_adv)
    assert out.loss.shape == ()
    expected = reference(model, x, y, x_adv)
    torch.testing.assert_close(out.loss, expected, rtol=1e-13, atol=0)
    params = list(model.parameters())
    ours = torch.autograd.grad(out.loss, params)
    theirs = torch.autograd.grad(expected, params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("name", list(CASES))
def test_loss_is_mean_of_independent_per_example_losses(name: str) -> None:
    """Each example's term is computed alone (batch of one, float64); the batch loss is their mean, in any order."""
    make_adapter, _ = CASES[name]
    model = groupnorm_cnn()
    x, y = batch()
    adapter = make_adapter()
    x_adv = adapter.attack(model, x, y)
    loss = adapter.loss_at(model, x, y, x_adv).loss
    alone = torch.stack([adapter.loss_at(model, x[i : i + 1], y[i : i + 1], x_adv[i : i + 1]).loss for i in range(len(x))])
    torch.testing.assert_close(loss, alone.mean(), rtol=1e-13, atol=0)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    permuted = adapter.loss_at(model, x[perm], y[perm], x_adv[perm]).loss
    torch.testing.assert_close(permuted, loss, rtol=1e-13, atol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_input_gradient_of_the_mean_loss_is_each_examples_own_over_batch_size(name: str) -> None:
    """Row ``i`` of ``grad_{x_adv} L`` is ``(1/B) grad_{x_adv_i} l_i``: examples do not interact (no BatchNorm)."""
    make_adapter, _ = CASES[name]
    model = groupnorm_cnn()
    x, y = batch()
    adapter = make_adapter()
    x_adv = adapter.attack(model, x, y).requires_grad_(True)
    (grad,) = torch.autograd.grad(adapter.loss_at(model, x, y, x_adv).loss, x_adv)
    for i in (0, 4):
        xi = x_adv[i : i + 1].detach().requires_grad_(True)
        (expected,) = torch.autograd.grad(adapter.loss_at(model, x[i : i + 1], y[i : i + 1], xi).loss, xi)
        torch.testing.assert_close(grad[i : i + 1], expected / len(x), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "adapter, loss, start",
    [(PGDAT, "ce", "uniform"), (TRADES, "kl", "normal"), (MART, "ce", "normal")],
)
def test_adapter_attack_is_the_documented_pgd(adapter: type, loss: str, start: str) -> None:
    model = groupnorm_cnn()
    x, y = batch()
    x_adv = adapter(eps=EPS, step_size=STEP, steps=3, generator=torch.Generator().manual_seed(4)).attack(model, x, y)
    expected = pgd_linf(model, x, y, loss=loss, eps=EPS, step_size=STEP, steps=3, random_start=start,
                        generator=torch.Generator().manual_seed(4))
    assert torch.equal(x_adv, expected)


@pytest.mark.parametrize("attack_eval_mode", [False, True])
def test_attack_eval_mode_only_during_the_attack(attack_eval_mode: bool) -> None:
    model = ModeRecorder(groupnorm_cnn()).train()
    x, y = batch()
    TRADES(steps=2, attack_eval_mode=attack_eval_mode)(model, x, y)
    # TRADES: clean target, 2 attack steps, then the clean and adversarial training forwards.
    assert model.modes == [not attack_eval_mode] * 3 + [True, True]
    assert model.training


def test_outputs_carry_detached_logits_and_clean_logits_where_computed() -> None:
    model = groupnorm_cnn()
    x, y = batch()
    pgd = PGDAT(steps=1)(model, x, y)
    trades = TRADES(steps=1)(model, x, y)
    assert pgd.logits_clean is None
    torch.testing.assert_close(trades.logits_clean, model(x).detach(), rtol=0, atol=0)
    for out in (pgd, trades):
        assert not out.logits_adv.requires_grad and not out.x_adv.requires_grad
        torch.testing.assert_close(out.logits_adv, model(out.x_adv).detach(), rtol=0, atol=0)
        assert out.loss.shape == () and out.loss.requires_grad


def test_registry_builds_every_method_and_awp_compositions() -> None:
    assert set(AT_METHODS) == {"pgd-at", "trades", "mart"}
    for name, cls in AT_METHODS.items():
        adapter = get_at_loss(name, steps=2)
        assert isinstance(adapter, cls) and adapter.name == name and adapter.steps == 2
        assert isinstance(adapter, ATLoss)
    awp = get_at_loss("awp-trades", beta=3.0, gamma_awp=1e-2, steps=1)
    assert isinstance(awp, AWP) and isinstance(awp.inner, TRADES) and isinstance(awp, ATLoss)
    assert (awp.name, awp.gamma_awp, awp.inner.beta, awp.inner.steps) == ("awp-trades", 1e-2, 3.0, 1)
    default = get_at_loss("awp-pgd-at")
    assert isinstance(default.inner, PGDAT) and default.gamma_awp == 5e-3


@pytest.mark.parametrize("name", ["madry", "awp-mart", "PGD-AT"])
def test_unknown_method_lists_the_valid_ones(name: str) -> None:
    with pytest.raises(ValueError, match=rf"Unknown AT method '{name}'.*pgd-at, trades, mart, awp-pgd-at, awp-trades"):
        get_at_loss(name)


@pytest.mark.parametrize(
    "build_adapter, match",
    [
        (lambda: PGDAT(eps=8), r"eps must be a number in \[0, 1\].*8/255"),
        (lambda: TRADES(step_size=-1.0), r"step_size must be a number in \[0, 1\]"),
        (lambda: TRADES(beta=-1.0), r"beta must be >= 0"),
        (lambda: MART(lam=-2.0), r"lam must be >= 0"),
        (lambda: get_at_loss("mart", steps=-3), r"steps must be an int >= 0"),
    ],
)
def test_bad_adapter_arguments_name_the_fix(build_adapter, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_adapter()
