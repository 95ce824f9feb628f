"""The ENGM identities of shared/README.md, accumulation, frozen parameters, groups, state_dict."""

from __future__ import annotations

import copy

import pytest
import torch
from models import build, inputs_for
from naive import naive_engm_step, naive_norms, naive_per_example_grads
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from engm_opacus import make_engm

LR = 0.2


def data(batch: int = 8, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    return inputs_for("cnn", batch, torch.Generator().manual_seed(seed))


def sgd(model: nn.Module, lr: float = LR) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)


def engm_steps(model: nn.Module, gamma: float, batches, optimizer_factory=sgd) -> nn.Module:
    wrapped, optimizer = make_engm(model, optimizer_factory(model), gamma=gamma)
    for x, y in batches:
        nn.functional.cross_entropy(wrapped(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def assert_same_parameters(a: nn.Module, b: nn.Module, atol: float = 1e-10) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=atol)


def test_large_gamma_is_momentum_sgd_with_lr_over_gamma() -> None:
    x, y = data()
    reference = build("cnn")
    gamma = 10.0 * float(naive_norms(naive_per_example_grads(reference, x, y)).max())
    engm_model = engm_steps(copy.deepcopy(reference), gamma, [(x, y)] * 3)
    # MSGD on the mean loss with lr/gamma; weight decay must scale the same way, so it is
    # folded in by scaling wd by gamma: ENGM applies d + wd*theta with d = mean/gamma.
    msgd = torch.optim.SGD(reference.parameters(), lr=LR / gamma, momentum=0.9, weight_decay=5e-4 * gamma)
    for _ in range(3):
        nn.functional.cross_entropy(reference(x), y).backward()
        msgd.step()
        msgd.zero_grad()
    assert_same_parameters(engm_model, reference)


def test_tiny_gamma_gives_direction_of_norm_at_most_one() -> None:
    x, y = data()
    model = build("cnn")
    wrapped, optimizer = make_engm(model, torch.optim.SGD(model.parameters(), lr=0.0), gamma=1e-12)
    nn.functional.cross_entropy(wrapped(x), y).backward()
    optimizer.step()
    stats = optimizer.last_step
    direction = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert float(direction.norm()) <= 1.0 + 1e-12
    assert stats.direction_norm == pytest.approx(float(direction.norm()), rel=1e-12)
    torch.testing.assert_close(stats.weights * stats.per_example_norms, torch.ones(len(x), dtype=torch.float64))
    assert stats.fraction_above_gamma == 1.0


def test_equals_opacus_clipping_without_noise_scaled_by_one_over_gamma() -> None:
    x, y = data()
    reference = build("cnn")
    norms = naive_norms(naive_per_example_grads(reference, x, y))
    gamma = float(norms.median())
    engm_model = copy.deepcopy(reference)
    wrapped, optimizer = make_engm(engm_model, torch.optim.SGD(engm_model.parameters(), lr=1.0), gamma=gamma)
    nn.functional.cross_entropy(wrapped(x), y).backward()
    optimizer.step()
    engm_direction = [p.grad.clone() for p in engm_model.parameters()]

    dp_model = GradSampleModule(copy.deepcopy(reference))
    dp = DPOptimizer(
        torch.optim.SGD(dp_model.parameters(), lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=gamma,
        expected_batch_size=len(x),
    )
    nn.functional.cross_entropy(dp_model(x), y).backward()
    dp.step()
    # Opacus's clip factor is min(1, C / (n_i + 1e-6)) while ENGM's gamma * w_i = min(1, C / n_i)
    # is exact. Per example the factors differ by at most C * 1e-6 / n_i**2 and |g_ij| <= n_i, so
    # every coordinate of d differs from Opacus's / C by at most 1e-6 / min_i n_i.
    bound = 1e-6 / float(norms.min())
    worst = max(float((d_engm - p.grad / gamma).abs().max()) for d_engm, p in zip(engm_direction, dp_model.parameters()))
    assert worst <= bound
    assert any(float(p.grad.abs().max()) > 1e3 * bound for p in dp_model.parameters())  # the bound is not vacuous


def test_two_backward_calls_equal_one_call_on_concatenated_batch() -> None:
    x, y = data(batch=10)
    reference = build("cnn")
    gamma = float(naive_norms(naive_per_example_grads(reference, x, y)).median())
    straight = engm_steps(copy.deepcopy(reference), gamma, [(x, y)] * 2)
    accumulated = copy.deepcopy(reference)
    wrapped, optimizer = make_engm(accumulated, sgd(accumulated), gamma=gamma)
    for _ in range(2):
        for part in (slice(0, 4), slice(4, 10)):  # unequal halves: divisor must be 10, not 2*5
            nn.functional.cross_entropy(wrapped(x[part]), y[part]).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert_same_parameters(straight, accumulated)


def test_expected_batch_size_divides_like_opacus() -> None:
    x, y = data(batch=8)
    reference = build("cnn")
    actual = copy.deepcopy(reference)
    w1, o1 = make_engm(actual, torch.optim.SGD(actual.parameters(), lr=1.0), gamma=1.0)
    nn.functional.cross_entropy(w1(x), y).backward()
    o1.step()
    fixed = copy.deepcopy(reference)
    w2, o2 = make_engm(fixed, torch.optim.SGD(fixed.parameters(), lr=1.0), gamma=1.0, expected_batch_size=16)
    nn.functional.cross_entropy(w2(x), y).backward()
    o2.step()
    for p, q in zip(actual.parameters(), fixed.parameters()):
        torch.testing.assert_close(q.grad, p.grad / 2, rtol=0, atol=1e-15)


def test_frozen_parameters_are_ignored_and_not_updated() -> None:
    x, y = data()
    reference = build("cnn")
    reference[0].weight.requires_grad_(False)
    frozen_before = reference[0].weight.detach().clone()
    gamma = float(naive_norms(naive_per_example_grads(reference, x, y)).median())
    engm_model = copy.deepcopy(reference)
    reference_sgd = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=LR, momentum=0.9)
    wrapped, optimizer = make_engm(
        engm_model, torch.optim.SGD([p for p in engm_model.parameters() if p.requires_grad], lr=LR, momentum=0.9), gamma=gamma
    )
    for _ in range(2):
        naive_engm_step(reference, reference_sgd, x, y, gamma)  # norms over trainable parameters only
        nn.functional.cross_entropy(wrapped(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(engm_model[0].weight, frozen_before)
    assert_same_parameters(engm_model, reference)


def test_parameter_groups_with_different_learning_rates() -> None:
    x, y = data()
    reference = build("cnn")
    gamma = float(naive_norms(naive_per_example_grads(reference, x, y)).median())

    def grouped(model: nn.Module) -> torch.optim.SGD:
        head, body = list(model[5].parameters()), [p for m in list(model)[:5] for p in m.parameters()]
        return torch.optim.SGD([{"params": body}, {"params": head, "lr": 0.05}], lr=LR, momentum=0.9, nesterov=True)

    engm_model = engm_steps(copy.deepcopy(reference), gamma, [(x, y)] * 3, grouped)
    reference_sgd = grouped(reference)
    for _ in range(3):
        naive_engm_step(reference, reference_sgd, x, y, gamma)
    assert_same_parameters(engm_model, reference)


def test_state_dict_round_trip_is_bit_identical() -> None:
    generator = torch.Generator().manual_seed(5)
    batches = [inputs_for("cnn", 6, generator) for _ in range(4)]
    straight = engm_steps(build("cnn"), 0.5, batches)

    first = build("cnn")
    wrapped, optimizer = make_engm(first, sgd(first), gamma=0.5)
    for x, y in batches[:2]:
        nn.functional.cross_entropy(wrapped(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    saved_model, saved_optimizer = copy.deepcopy(first.state_dict()), copy.deepcopy(optimizer.state_dict())

    resumed = build("cnn", seed=99)
    resumed.load_state_dict(saved_model)
    wrapped, optimizer = make_engm(resumed, sgd(resumed), gamma=0.5)
    optimizer.load_state_dict(saved_optimizer)
    for x, y in batches[2:]:
        nn.functional.cross_entropy(wrapped(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_lr_scheduler_drives_the_wrapped_optimizer() -> None:
    x, y = data()
    reference = build("cnn")
    engm_model = copy.deepcopy(reference)
    wrapped, optimizer = make_engm(engm_model, sgd(engm_model), gamma=0.4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[1], gamma=0.1)
    reference_sgd = sgd(reference)
    reference_scheduler = torch.optim.lr_scheduler.MultiStepLR(reference_sgd, milestones=[1], gamma=0.1)
    for _ in range(2):
        nn.functional.cross_entropy(wrapped(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        naive_engm_step(reference, reference_sgd, x, y, 0.4)
        reference_scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(LR * 0.1)
    assert_same_parameters(engm_model, reference)


def test_other_torch_optimizers_are_wrapped() -> None:
    x, y = data()
    reference = build("cnn")
    gamma = 0.3
    engm_model = engm_steps(copy.deepcopy(reference), gamma, [(x, y)] * 2, lambda m: torch.optim.Adam(m.parameters(), lr=1e-2))
    adam = torch.optim.Adam(reference.parameters(), lr=1e-2)
    for _ in range(2):
        naive_engm_step(reference, adam, x, y, gamma)
    assert_same_parameters(engm_model, reference)


def test_backward_seam_takes_per_example_losses() -> None:
    x, y = data()
    reference = build("cnn")
    engm_model = copy.deepcopy(reference)
    wrapped, optimizer = make_engm(engm_model, sgd(engm_model), gamma=0.4)
    optimizer.backward(nn.functional.cross_entropy(wrapped(x), y, reduction="none"))
    optimizer.step()
    reference_sgd = sgd(reference)
    naive_engm_step(reference, reference_sgd, x, y, 0.4)
    assert_same_parameters(engm_model, reference)
