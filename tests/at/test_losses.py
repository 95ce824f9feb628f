"""AT loss adapters: per-example losses vs the reference codebases' batch losses, independence, input leaf, registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import build, inputs_for
from torch import nn

from engm_opacus.attacks import pgd_linf
from engm_opacus.losses import AT_METHODS, AWP, MART, PGDAT, TRADES, AttackResult, get_at_loss
from engm_opacus.losses.base import ATLoss

EPS = 0.1
STEP = 0.03


def batch(size: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return inputs_for("cnn", size, torch.Generator().manual_seed(seed))


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
def test_mean_of_per_example_losses_is_reference_batch_loss_with_same_gradient(name: str) -> None:
    make_adapter, reference = CASES[name]
    model = build("cnn")
    x, y = batch()
    adapter = make_adapter()
    attack = adapter.attack(model, x, y)
    out = adapter.loss_at(model, x, y, attack)
    assert out.per_example.shape == (len(x),)
    expected = reference(model, x, y, attack.x_adv)
    torch.testing.assert_close(out.per_example.mean(), expected, rtol=1e-13, atol=0)
    params = list(model.parameters())
    ours = torch.autograd.grad(out.per_example.mean(), params)
    theirs = torch.autograd.grad(expected, params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("name", list(CASES))
def test_example_loss_does_not_depend_on_the_other_examples(name: str) -> None:
    make_adapter, _ = CASES[name]
    model = build("cnn")
    x, y = batch()
    adapter = make_adapter()
    attack = adapter.attack(model, x, y)
    losses = adapter.loss_at(model, x, y, attack).per_example
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    permuted = adapter.loss_at(model, x[perm], y[perm], AttackResult(attack.x_adv[perm])).per_example
    torch.testing.assert_close(permuted, losses[perm], rtol=1e-14, atol=0)
    alone = adapter.loss_at(model, x[2:3], y[2:3], AttackResult(attack.x_adv[2:3])).per_example
    torch.testing.assert_close(alone, losses[2:3], rtol=1e-14, atol=0)


@pytest.mark.parametrize(
    "adapter, loss, start",
    [(PGDAT, "ce", "uniform"), (TRADES, "kl", "normal"), (MART, "ce", "normal")],
)
def test_adapter_attack_is_the_documented_pgd(adapter: type, loss: str, start: str) -> None:
    model = build("cnn")
    x, y = batch()
    result = adapter(eps=EPS, step_size=STEP, steps=3, generator=torch.Generator().manual_seed(4)).attack(model, x, y)
    expected, grad = pgd_linf(model, x, y, loss=loss, eps=EPS, step_size=STEP, steps=3, random_start=start,
                              generator=torch.Generator().manual_seed(4), return_input_grad=True)
    assert torch.equal(result.x_adv, expected)
    if adapter is PGDAT:
        assert torch.equal(result.input_grad, grad)
    else:
        assert result.input_grad is None


@pytest.mark.parametrize("name", list(CASES))
def test_track_input_grad_gives_leaf_with_each_examples_own_input_gradient(name: str) -> None:
    make_adapter, _ = CASES[name]
    model = build("cnn")
    x, y = batch()
    out = make_adapter()(model, x, y, track_input_grad=True)
    assert out.x_adv.is_leaf and out.x_adv.requires_grad
    (grad,) = torch.autograd.grad(out.per_example.sum(), out.x_adv, retain_graph=True)
    adapter = make_adapter()
    for i in (0, 4):
        alone = adapter.loss_at(model, x[i : i + 1], y[i : i + 1], AttackResult(out.x_adv[i : i + 1].detach()),
                                track_input_grad=True)
        (expected,) = torch.autograd.grad(alone.per_example.sum(), alone.x_adv)
        torch.testing.assert_close(grad[i : i + 1], expected, rtol=1e-12, atol=1e-14)
    plain = make_adapter()(model, x, y)
    assert not plain.x_adv.requires_grad


class ModeRecorder(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return self.inner(x)


@pytest.mark.parametrize("attack_eval_mode", [False, True])
def test_attack_eval_mode_only_during_the_attack(attack_eval_mode: bool) -> None:
    model = ModeRecorder(build("cnn")).train()
    x, y = batch()
    TRADES(steps=2, attack_eval_mode=attack_eval_mode)(model, x, y)
    # TRADES: clean target, 2 attack steps, then the clean and adversarial training forwards.
    assert model.modes == [not attack_eval_mode] * 3 + [True, True]
    assert model.training


def test_outputs_carry_detached_logits_and_clean_logits_where_computed() -> None:
    model = build("cnn")
    x, y = batch()
    pgd = PGDAT(steps=1)(model, x, y)
    trades = TRADES(steps=1)(model, x, y)
    assert pgd.logits_clean is None and pgd.attack_input_grad is not None
    assert trades.attack_input_grad is None
    torch.testing.assert_close(trades.logits_clean, model(x).detach(), rtol=0, atol=0)
    for out in (pgd, trades):
        assert not out.logits_adv.requires_grad
        torch.testing.assert_close(out.logits_adv, model(out.x_adv).detach(), rtol=0, atol=0)
        assert isinstance(out.per_example, torch.Tensor) and out.per_example.requires_grad


def test_registry_builds_every_method_and_awp_compositions() -> None:
    assert set(AT_METHODS) == {"pgd-at", "trades", "mart"}
    for name, cls in AT_METHODS.items():
        adapter = get_at_loss(name, steps=2)
        assert isinstance(adapter, cls) and adapter.name == name and adapter.steps == 2
        assert isinstance(adapter, ATLoss)
    awp = get_at_loss("awp-trades", beta=3.0, gamma_awp=1e-2, steps=1)
    assert isinstance(awp, AWP) and isinstance(awp.inner, TRADES)
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
