"""train_step: ENGM (Opacus hooks) equals the naive per-example loop; MSGD path; the backward seam; metrics."""

from __future__ import annotations

import copy
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from models import build, inputs_for
from naive import naive_engm_step
from torch import nn

from engm_opacus import ENGMOptimizer, make_engm
from engm_opacus.attacks import per_example_hooks_paused
from engm_opacus.losses import MART, PGDAT, TRADES, ATLoss, ATLossOutput, AttackResult, get_at_loss
from engm_opacus.step import StepMetrics, train_step

EPS, STEP, STEPS = 0.1, 0.03, 3


def batch(size: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return inputs_for("cnn", size, torch.Generator().manual_seed(seed))


def sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=5e-4)


@pytest.mark.parametrize("grad_sample_mode", ["hooks", "functorch"])
def test_engm_pgd_at_steps_equal_naive_per_example_loop(grad_sample_mode: str) -> None:
    """Two steps (momentum engaged); both sides attack with generators of the same seed."""
    gamma = 3.0
    reference = build("cnn")
    model = copy.deepcopy(reference)
    wrapped, optimizer = make_engm(model, sgd(model), gamma=gamma, grad_sample_mode=grad_sample_mode)
    adapter = PGDAT(eps=EPS, step_size=STEP, steps=STEPS, generator=torch.Generator().manual_seed(0))
    reference_attack = PGDAT(eps=EPS, step_size=STEP, steps=STEPS, generator=torch.Generator().manual_seed(0))
    reference_sgd = sgd(reference)
    fractions = []
    for seed in (0, 1):
        x, y = batch(seed=seed)
        x_adv = reference_attack.attack(reference, x, y).x_adv
        expected_loss = float(F.cross_entropy(reference(x_adv), y))
        metrics = train_step(wrapped, optimizer, adapter, x, y)
        naive_engm_step(reference, reference_sgd, x_adv, y, gamma)
        assert metrics.loss == pytest.approx(expected_loss, rel=1e-12)
        fractions.append(optimizer.last_step.fraction_above_gamma)
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert any(0.0 < f < 1.0 for f in fractions)  # gamma is active for some examples only


def stacked_loss(adapter: TRADES | MART):
    """Per-example loss on ``[x, x_adv]`` stacked along channels, for the naive loop (one example at a time)."""

    def loss_fn(model: nn.Module, stacked: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return adapter.loss_at(model, stacked[:, :1], y, AttackResult(stacked[:, 1:])).per_example

    return loss_fn


@pytest.mark.parametrize("adapter_cls", [TRADES, MART])
def test_engm_trades_and_mart_step_equal_naive_per_example_loop(adapter_cls: type) -> None:
    gamma = 1.0
    reference = build("cnn")
    model = copy.deepcopy(reference)
    wrapped, optimizer = make_engm(model, sgd(model), gamma=gamma)
    x, y = batch()
    adapter = adapter_cls(eps=EPS, step_size=STEP, steps=STEPS, generator=torch.Generator().manual_seed(2))
    x_adv = adapter_cls(eps=EPS, step_size=STEP, steps=STEPS, generator=torch.Generator().manual_seed(2)).attack(reference, x, y).x_adv
    train_step(wrapped, optimizer, adapter, x, y)
    naive_engm_step(reference, sgd(reference), torch.cat([x, x_adv], dim=1), y, gamma, stacked_loss(adapter))
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_plain_torch_optimizer_gets_the_mean_loss_backward() -> None:
    reference = build("cnn")
    model = copy.deepcopy(reference)
    x, y = batch()
    adapter = TRADES(eps=EPS, step_size=STEP, steps=STEPS, generator=torch.Generator().manual_seed(3))
    x_adv = TRADES(eps=EPS, step_size=STEP, steps=STEPS, generator=torch.Generator().manual_seed(3)).attack(reference, x, y).x_adv
    optimizer = sgd(model)
    train_step(model, optimizer, adapter, x, y)
    assert all(p.grad is None for p in model.parameters())  # zero_grad ran
    reference_sgd = sgd(reference)
    adapter.loss_at(reference, x, y, AttackResult(x_adv)).per_example.mean().backward()
    reference_sgd.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


class SeamWithAtOutput(ENGMOptimizer):
    """A variant that needs the adapter's output and an input-gradient leaf (as the cheap ENGM does)."""

    needs_input_grad = True

    def backward(self, per_example_losses: torch.Tensor, at_output: Optional[ATLossOutput] = None) -> None:
        self.seen = (per_example_losses, at_output)
        with per_example_hooks_paused(self.model):  # an input-only backward must not consume Opacus's activations
            (grad,) = torch.autograd.grad(per_example_losses.sum(), at_output.x_adv, retain_graph=True)
        self.input_grad_shape = grad.shape
        super().backward(per_example_losses)


class SeamWithoutAtOutput(ENGMOptimizer):
    def backward(self, per_example_losses: torch.Tensor) -> None:
        self.seen = per_example_losses
        super().backward(per_example_losses)


def test_backward_seam_passes_at_output_when_accepted_and_tracks_input_grad_on_request() -> None:
    x, y = batch()
    for cls in (SeamWithAtOutput, SeamWithoutAtOutput):
        model = build("cnn")
        wrapped, _ = make_engm(model, sgd(model), gamma=1.0)
        optimizer = cls(sgd(model), gamma=1.0)
        optimizer.model = wrapped
        metrics = train_step(wrapped, optimizer, PGDAT(steps=1), x, y)
        if cls is SeamWithAtOutput:
            losses, out = optimizer.seen
            assert isinstance(out, ATLossOutput) and losses is out.per_example
            assert out.x_adv.is_leaf and out.x_adv.requires_grad and optimizer.input_grad_shape == x.shape
        else:
            assert optimizer.seen.shape == (len(x),)
        assert metrics.batch_size == len(x)


@pytest.mark.parametrize("name", ["pgd-at", "trades", "awp-trades"])
def test_metrics_describe_the_batch_before_the_step(name: str) -> None:
    model = build("cnn")
    x, y = batch(8)
    adapter = get_at_loss(name, steps=1, generator=torch.Generator().manual_seed(5))
    probe = get_at_loss(name, steps=1, generator=torch.Generator().manual_seed(5))
    out = probe(copy.deepcopy(model), x, y)
    metrics = train_step(model, sgd(model), adapter, x, y)
    assert isinstance(metrics, StepMetrics)
    assert metrics.loss == pytest.approx(float(out.per_example.mean()), rel=1e-12)
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
    model = build("cnn")
    original = [p.detach().clone() for p in model.parameters()]
    x, y = batch()
    with pytest.raises(RuntimeError, match="step failed"):
        train_step(model, FailingSGD(model.parameters(), lr=0.1), get_at_loss("awp-pgd-at", steps=1), x, y)
    for p, q in zip(model.parameters(), original):
        assert torch.equal(p, q)


class NaturalTraining:
    """A user's own loss through the protocol: clean cross-entropy (no attack)."""

    name = "natural"

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, track_input_grad: bool = False) -> ATLossOutput:
        logits = model(x)
        return ATLossOutput(per_example=F.cross_entropy(logits, y, reduction="none"), x_adv=x, logits_adv=logits.detach())


def test_a_users_own_loss_plugs_in_through_the_protocol() -> None:
    gamma = 1.0
    reference = build("cnn")
    model = copy.deepcopy(reference)
    wrapped, optimizer = make_engm(model, sgd(model), gamma=gamma)
    x, y = batch()
    assert isinstance(NaturalTraining(), ATLoss)
    metrics = train_step(wrapped, optimizer, NaturalTraining(), x, y)
    naive_engm_step(reference, sgd(reference), x, y, gamma)
    assert metrics.clean_correct is None and metrics.batch_size == len(x)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
