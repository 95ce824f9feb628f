"""Ghost-norm ENGM equals hooks ENGM equals an independent per-example loop (float64, 1e-10), for PGD-AT, TRADES, MART."""

from __future__ import annotations

import copy
from typing import Callable, Dict

import pytest
import torch
from models import build, inputs_for
from naive import naive_engm_step, naive_norms, naive_per_example_grads
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from torch import nn

from engm_opacus import make_engm
from engm_opacus import ghost
from engm_opacus.ghost import GhostNormModule, TwoPassENGMOptimizer
from engm_opacus.losses.base import AttackResult
from engm_opacus.losses.mart import MART
from engm_opacus.losses.trades import TRADES

BATCH = 6
STEPS = 2


pytestmark = pytest.mark.usefixtures("one_thread")


PairLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def pgd_at_loss(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PGD-AT: ``CE(f(x_adv_i), y_i)`` (one forward)."""
    return nn.functional.cross_entropy(model(x_adv), y, reduction="none")


def trades_loss(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """TRADES' per-example loss from the library adapter at a fixed ``x_adv`` (two forwards)."""
    return TRADES(beta=6.0).loss_at(model, x, y, AttackResult(x_adv=x_adv)).per_example


def mart_loss(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MART's per-example loss from the library adapter at a fixed ``x_adv`` (two forwards)."""
    return MART(lam=5.0).loss_at(model, x, y, AttackResult(x_adv=x_adv)).per_example


AT_LOSSES: Dict[str, PairLoss] = {"pgd-at": pgd_at_loss, "trades": trades_loss, "mart": mart_loss}


def stacked(loss: PairLoss) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss as a function of ``X = stack([x, x_adv], 1)``, so a per-example loop can slice ``X[i:i+1]``."""
    return lambda model, pair, y: loss(model, pair[:, 0], pair[:, 1], y)


def adversarial_batches(name: str, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``STEPS`` batches of ``(X = stack([x, x_adv], 1), y)`` with a fixed perturbation inside [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(STEPS):
        x, y = inputs_for(name, BATCH, generator)
        delta = (torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1) * (8 / 255)
        batches.append((torch.stack([x, (x + delta).clamp(0, 1)], dim=1), y))
    return batches


def sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9, weight_decay=5e-4)


def engm_steps(model: nn.Module, mode: str, gamma: float, loss: PairLoss, batches: list) -> TwoPassENGMOptimizer:
    wrapped, optimizer = make_engm(model, sgd(model), gamma=gamma, grad_sample_mode=mode)
    for pair, y in batches:
        optimizer.backward(loss(wrapped, pair[:, 0], pair[:, 1], y))
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("loss_name", sorted(AT_LOSSES))
@pytest.mark.parametrize("where", ["below", "between"])
def test_ghost_equals_hooks_equals_naive_loop(name: str, loss_name: str, where: str) -> None:
    loss = AT_LOSSES[loss_name]
    reference = build(name)
    batches = adversarial_batches(name)
    norms = naive_norms(naive_per_example_grads(reference, *batches[0], stacked(loss)))
    gamma = 0.5 * float(norms.min()) if where == "below" else float(norms.median())
    models = {mode: copy.deepcopy(reference) for mode in ("hooks", "ghost")}
    optimizers = {mode: engm_steps(models[mode], mode, gamma, loss, batches) for mode in models}
    reference_sgd = sgd(reference)
    for pair, y in batches:
        last_norms = naive_norms(naive_per_example_grads(reference, pair, y, stacked(loss)))
        naive_engm_step(reference, reference_sgd, pair, y, gamma, stacked(loss))
    assert isinstance(models["ghost"], nn.Module) and isinstance(optimizers["ghost"], TwoPassENGMOptimizer)
    for mode, model in models.items():
        for p, p_ref in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, p_ref, rtol=0, atol=1e-10)
        torch.testing.assert_close(optimizers[mode].last_step.per_example_norms, last_norms, rtol=0, atol=1e-10)
    moved = max(float((p - q).abs().max()) for p, q in zip(reference.parameters(), build(name).parameters()))
    assert moved > 1e-3


def test_embedding_ghost_norms_equal_naive_loop() -> None:
    reference = build("embedding")
    x, y = inputs_for("embedding", BATCH, torch.Generator().manual_seed(3))
    gamma = float(naive_norms(naive_per_example_grads(reference, x, y)).median())
    model = copy.deepcopy(reference)
    wrapped, optimizer = make_engm(model, sgd(model), gamma=gamma, grad_sample_mode="ghost")
    optimizer.backward(nn.functional.cross_entropy(wrapped(x), y, reduction="none"))
    optimizer.step()
    naive_engm_step(reference, sgd(reference), x, y, gamma)
    for p, p_ref in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, p_ref, rtol=0, atol=1e-10)


def test_opacus_ghost_refuses_two_forwards_and_ghost_module_does_not() -> None:
    """Why GhostNormModule exists: TRADES/MART call every layer twice per example."""
    (pair, y), *_ = adversarial_batches("mlp")
    opacus_module = GradSampleModuleFastGradientClipping(build("mlp"), loss_reduction="mean")
    with pytest.raises(NotImplementedError, match="Parameter tying"):
        trades_loss(opacus_module, pair[:, 0], pair[:, 1], y)
    wrapped, optimizer = make_engm(build("mlp"), sgd(build("mlp")), gamma=1.0, grad_sample_mode="ghost")
    assert isinstance(wrapped, GhostNormModule)


def test_ghost_path_allocates_no_per_sample_gradients() -> None:
    model = build("cnn")
    wrapped, optimizer = make_engm(model, sgd(model), gamma=1.0, grad_sample_mode="ghost")
    pair, y = adversarial_batches("cnn")[0]
    optimizer.backward(trades_loss(wrapped, pair[:, 0], pair[:, 1], y))
    for p in model.parameters():
        assert getattr(p, "grad_sample", None) is None
        assert not hasattr(p, "_current_grad_sample")
        assert getattr(p, "_norm_sample", None) is None
        assert p.grad is not None and p.grad.shape == p.shape
    optimizer.step()
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())


def test_accumulated_backward_calls_equal_one_call_on_the_whole_batch() -> None:
    pair, y = adversarial_batches("cnn")[0]
    results = []
    for chunks in (1, 2):
        model = build("cnn")
        wrapped, optimizer = make_engm(model, sgd(model), gamma=0.5, grad_sample_mode="ghost")
        for part, labels in zip(pair.chunk(chunks), y.chunk(chunks)):
            optimizer.backward(trades_loss(wrapped, part[:, 0], part[:, 1], labels))
        assert optimizer.accumulated_iterations == chunks
        optimizer.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*results):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_attack_through_the_wrapped_model_leaves_the_step_unchanged() -> None:
    """An input-gradient attack (train mode) through the ghost module does not leak into the norms."""
    pair, y = adversarial_batches("cnn")[0]
    results = []
    for attack_first in (False, True):
        model = build("cnn")
        wrapped, optimizer = make_engm(model, sgd(model), gamma=0.5, grad_sample_mode="ghost")
        if attack_first:
            x = pair[:, 1].clone().requires_grad_(True)
            torch.autograd.grad(nn.functional.cross_entropy(wrapped(x), y), x)
        optimizer.backward(pgd_at_loss(wrapped, pair[:, 0], pair[:, 1], y))
        optimizer.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*results):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "bad, pattern",
    [
        (lambda losses: losses.mean(), r"shape \[B\], got \(\).*reduction='none'"),
        (lambda losses: losses.unsqueeze(1), r"shape \[B\], got \(6, 1\).*reduction='none'"),
        (lambda losses: losses[:-1], r"batches of 6 examples but 5 per-example losses.*Fix: pass one loss per example"),
    ],
)
def test_wrong_loss_shape_is_a_clear_error(bad: Callable, pattern: str) -> None:
    model = build("mlp")
    wrapped, optimizer = make_engm(model, sgd(model), gamma=1.0, grad_sample_mode="ghost")
    pair, y = adversarial_batches("mlp")[0]
    with pytest.raises(ValueError, match=pattern):
        optimizer.backward(bad(pgd_at_loss(wrapped, pair[:, 0], pair[:, 1], y)))


def test_loss_backward_without_the_seam_is_refused_at_step() -> None:
    model = build("mlp")
    wrapped, optimizer = make_engm(model, sgd(model), gamma=1.0, grad_sample_mode="ghost")
    pair, y = adversarial_batches("mlp")[0]
    pgd_at_loss(wrapped, pair[:, 0], pair[:, 1], y).mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"Fix: call optimizer\.backward\(per_example_losses\)"):
        optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nonfinite_norm_raises_or_skips(policy: str) -> None:
    model = build("mlp")
    wrapped, optimizer = make_engm(model, sgd(model), gamma=1.0, grad_sample_mode="ghost", on_nonfinite=policy)
    pair, y = adversarial_batches("mlp")[0]
    losses = pgd_at_loss(wrapped, pair[:, 0], pair[:, 1], y) * torch.tensor([1.0] * 5 + [float("nan")], dtype=torch.float64)
    before = [p.detach().clone() for p in model.parameters()]
    if policy == "raise":
        with pytest.raises(FloatingPointError, match=r"examples \[5\].*on_nonfinite='skip'"):
            optimizer.backward(losses)
        return
    optimizer.backward(losses)
    optimizer.step()
    assert optimizer.last_step.skipped
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize(
    "conv, size",
    [
        (nn.Conv2d(3, 8, 3, padding=1), 2),  # T^2 <= p*D: ghost norm
        (nn.Conv2d(2, 2, 3, padding=2, dilation=2, stride=2, bias=False), 9),  # T^2 > p*D: per-example gradients
        (nn.Conv2d(4, 4, 3, padding="same", groups=2), 5),  # Opacus's grad sampler
    ],
)
def test_conv2d_norm_sample_equals_per_example_autograd(conv: nn.Conv2d, size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ghost, "CHUNK_ELEMENTS", 1)  # chunks of at most x.numel() elements: several per batch
    conv = conv.double()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, conv.in_channels, size, size, generator=generator, dtype=torch.float64)
    backprops = torch.randn(conv(x).shape, generator=generator, dtype=torch.float64)
    norms = ghost.conv2d_norm_sample(conv, [x], backprops)
    for p in conv.parameters():
        expected = torch.stack(
            [torch.autograd.grad((conv(x[i : i + 1]) * backprops[i : i + 1]).sum(), p)[0].norm() for i in range(len(x))]
        )
        torch.testing.assert_close(norms[p], expected, rtol=0, atol=1e-10)
    assert set(norms) == set(conv.parameters())


def test_group_norm_norm_sample_in_chunks_equals_per_example_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ghost, "CHUNK_ELEMENTS", 1)  # chunks of len(x) // 8 examples
    torch.manual_seed(0)
    layer = nn.GroupNorm(2, 4).double()
    nn.init.uniform_(layer.weight, 0.5, 1.5)
    x = torch.randn(17, 4, 3, 3, dtype=torch.float64)
    backprops = torch.randn(x.shape, dtype=torch.float64)
    norms = ghost.group_norm_norm_sample(layer, [x], backprops)
    for p in layer.parameters():
        expected = torch.stack(
            [torch.autograd.grad((layer(x[i : i + 1]) * backprops[i : i + 1]).sum(), p)[0].norm() for i in range(len(x))]
        )
        torch.testing.assert_close(norms[p], expected, rtol=0, atol=1e-10)
