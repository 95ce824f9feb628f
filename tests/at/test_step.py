"""train_step: MSGD (any torch optimizer) and ENGM equal their references; the call order; metrics; AWP restore; own losses."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engm_opacus import make_engm
from engm_opacus.at.losses import MART, PGDAT, TRADES, ATLoss, ATLossOutput, get_at_loss
from engm_opacus.at.step import StepMetrics, train_step
from tests.helpers.naive import naive_engm_step, per_example_grads_copies, per_example_grads_loop
from tests.helpers.nets import groupnorm_cnn, images, preact_batchnorm

EPS, STEP, STEPS = 0.1, 0.03, 3


def batch(size: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return images(size, torch.Generator().manual_seed(seed))


def sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=5e-4)


def adapter_loss(adapter: PGDAT | TRADES | MART):
    """``loss_fn(model, x, x_adv, y)``: the adapter's mean-reduced loss, for the naive references."""
    return lambda model, x, x_adv, y: adapter.loss_at(model, x, y, x_adv).loss


@pytest.mark.parametrize("adapter_cls", [PGDAT, TRADES, MART])
def test_engm_steps_equal_naive_per_example_loop(adapter_cls: type) -> None:
    """Two steps (momentum engaged); both sides attack with generators of the same seed."""
    gamma = 1.0
    reference = groupnorm_cnn()
    model = copy.deepcopy(reference)
    wrapped, optimizer = make_engm(model, sgd(model), gamma=gamma)
    adapter = adapter_cls(eps=EPS, step_size=STEP, steps=STEPS, generator=torch.Generator().manual_seed(0))
    reference_adapter = adapter_cls(eps=EPS, step_size=STEP, steps=STEPS, generator=torch.Generator().manual_seed(0))
    reference_sgd = sgd(reference)
    for seed in (0, 1):
        x, y = batch(seed=seed)
        x_adv = reference_adapter.attack(reference, x, y)
        expected_loss = float(reference_adapter.loss_at(reference, x, y, x_adv).loss.detach())
        metrics = train_step(wrapped, optimizer, adapter, x, y)
        per_example = per_example_grads_loop(reference, adapter_loss(reference_adapter), x, x_adv, y)
        naive_engm_step(reference, reference_sgd, per_example, gamma)
        assert metrics.loss == pytest.approx(expected_loss, rel=1e-12)
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_engm_trades_step_with_batchnorm_equals_per_parameter_copy_reference() -> None:
    """BatchNorm PreAct net (``out += shortcut``): g_i = B dL/dtheta^(i) from a naive per-parameter-copy computation."""
    gamma = 0.5
    reference = preact_batchnorm()
    model = copy.deepcopy(reference)
    wrapped, optimizer = make_engm(model, sgd(model), gamma=gamma)
    x, y = batch()
    adapter = TRADES(eps=EPS, step_size=STEP, steps=2, generator=torch.Generator().manual_seed(2))
    reference_adapter = TRADES(eps=EPS, step_size=STEP, steps=2, generator=torch.Generator().manual_seed(2))
    wrapped.train()
    reference.train()
    x_adv = reference_adapter.attack(reference, x, y)
    train_step(wrapped, optimizer, adapter, x, y)
    per_example = per_example_grads_copies(reference, adapter_loss(reference_adapter), x, x_adv, y)
    naive_engm_step(reference, sgd(reference), per_example, gamma)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    for b, c in zip(model.buffers(), reference.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.SGD(params, lr=0.2, momentum=0.9, weight_decay=5e-4),
    lambda params: torch.optim.Adam(params, lr=1e-2),
])
def test_plain_torch_optimizer_steps_on_the_mean_loss_backward(make_optimizer) -> None:
    reference = groupnorm_cnn()
    model = copy.deepcopy(reference)
    x, y = batch()
    adapter = TRADES(eps=EPS, step_size=STEP, steps=STEPS, generator=torch.Generator().manual_seed(3))
    x_adv = TRADES(eps=EPS, step_size=STEP, steps=STEPS, generator=torch.Generator().manual_seed(3)).attack(reference, x, y)
    train_step(model, make_optimizer(model.parameters()), adapter, x, y)
    assert all(p.grad is None for p in model.parameters())  # zero_grad ran
    reference_optimizer = make_optimizer(reference.parameters())
    adapter.loss_at(reference, x, y, x_adv).loss.backward()
    reference_optimizer.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


class RecordingSGD(torch.optim.SGD):
    """Logs ``step`` and ``zero_grad`` calls into a shared list."""

    def __init__(self, params, log: list[str]):
        super().__init__(params, lr=0.1)
        self.log = log

    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        self.log.append("step")
        return super().step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.log.append("zero_grad")
        super().zero_grad(set_to_none)


class RecordingLoss:
    """An AT loss whose ``loss.backward()`` is logged (through a tensor hook)."""

    name = "recording"

    def __init__(self, log: list[str]):
        self.log = log

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> ATLossOutput:
        self.log.append("loss")
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.register_hook(lambda grad: self.log.append("backward"))
        return ATLossOutput(loss=loss, x_adv=x, logits_adv=logits.detach())


def test_one_loss_one_backward_then_step_then_zero_grad() -> None:
    log: list[str] = []
    model = groupnorm_cnn()
    x, y = batch()
    train_step(model, RecordingSGD(model.parameters(), log), RecordingLoss(log), x, y)
    assert log == ["loss", "backward", "step", "zero_grad"]


@pytest.mark.parametrize("name", ["pgd-at", "trades", "awp-trades"])
def test_metrics_describe_the_batch_before_the_step(name: str) -> None:
    model = groupnorm_cnn()
    x, y = batch(8)
    adapter = get_at_loss(name, steps=1, generator=torch.Generator().manual_seed(5))
    probe = get_at_loss(name, steps=1, generator=torch.Generator().manual_seed(5))
    out = probe(copy.deepcopy(model), x, y)
    metrics = train_step(model, sgd(model), adapter, x, y)
    assert isinstance(metrics, StepMetrics)
    assert metrics.loss == pytest.approx(float(out.loss.detach()), rel=1e-12)
    assert metrics.robust_correct == int((out.logits_adv.argmax(1) == y).sum())
    assert metrics.batch_size == 8
    if name == "pgd-at":
        assert metrics.clean_correct is None
    else:
        assert metrics.clean_correct == int((out.logits_clean.argmax(1) == y).sum())


class FailingSGD(torch.optim.SGD):
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        raise RuntimeError("step failed")


def test_awp_weights_restored_even_when_the_step_raises() -> None:
    model = groupnorm_cnn()
    original = [p.detach().clone() for p in model.parameters()]
    x, y = batch()
    with pytest.raises(RuntimeError, match="step failed"):
        train_step(model, FailingSGD(model.parameters(), lr=0.1), get_at_loss("awp-pgd-at", steps=1), x, y)
    for p, q in zip(model.parameters(), original):
        assert torch.equal(p, q)


class NaturalTraining:
    """A user's own loss through the protocol: clean cross-entropy (no attack)."""

    name = "natural"

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> ATLossOutput:
        logits = model(x)
        return ATLossOutput(loss=F.cross_entropy(logits, y), x_adv=x, logits_adv=logits.detach())


def test_a_users_own_loss_plugs_in_through_the_protocol() -> None:
    gamma = 1.0
    reference = groupnorm_cnn()
    model = copy.deepcopy(reference)
    wrapped, optimizer = make_engm(model, sgd(model), gamma=gamma)
    x, y = batch()
    assert isinstance(NaturalTraining(), ATLoss)
    metrics = train_step(wrapped, optimizer, NaturalTraining(), x, y)
    per_example = per_example_grads_loop(reference, lambda m, xs, ys: F.cross_entropy(m(xs), ys), x, y)
    naive_engm_step(reference, sgd(reference), per_example, gamma)
    assert metrics.clean_correct is None and metrics.batch_size == len(x)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
