"""The cheap ENGM variant (input-gradient norms) against independent per-example loops, float64."""

from __future__ import annotations

import copy
from typing import Callable, Dict, List

import pytest
import torch
import torch.nn.functional as F
from models import build, small_cnn
from naive import naive_engm_step, naive_norms, naive_per_example_grads
from torch import nn

from engm_opacus import make_engm
from engm_opacus.attacks import pgd_linf
from engm_opacus.cheap import InputNormENGMOptimizer, exact_per_example_norms
from engm_opacus.losses.base import ATLossOutput
from engm_opacus.losses.pgd_at import PGDAT
from engm_opacus.losses.trades import TRADES
from engm_opacus.models import preact_resnet18
from engm_opacus.step import train_step
from engm_opacus.weights import engm_weights

BATCH = 6


def data(seed: int, batch: int = BATCH, shape: tuple = (1, 4, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.rand(batch, *shape, generator=generator, dtype=torch.float64),
        torch.randint(0, 5, (batch,), generator=generator),
    )


def naive_input_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``||grad_{x_i} CE(f(x_i), y_i)||`` one example at a time."""
    norms = []
    for i in range(len(x)):
        xi = x[i : i + 1].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(xi), y[i : i + 1]), xi)
        norms.append(grad.norm())
    return torch.stack(norms)


def cheap_backward(model: nn.Module, optimizer: InputNormENGMOptimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    leaf = x.clone().requires_grad_(True)
    optimizer.backward(F.cross_entropy(model(leaf), y, reduction="none"), inputs=leaf)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("gamma_quantile", [0.0, 0.5, 1.0])
def test_exact_ratio_scale_equals_exact_engm(name: str, gamma_quantile: float) -> None:
    """With s_i = n_i / ||grad_x l_i|| per example (hook), 3 cheap steps equal exact ENGM's naive loop."""
    reference = build(name)
    model = copy.deepcopy(reference)
    batches = [data(seed) for seed in range(3)]
    norms0 = naive_norms(naive_per_example_grads(reference, *batches[0]))
    gamma = float(torch.quantile(norms0, gamma_quantile)) * (0.5 if gamma_quantile == 0 else 1.0)
    current: Dict[str, torch.Tensor] = {}

    def exact_ratio(input_norms: torch.Tensor) -> torch.Tensor:
        return naive_norms(naive_per_example_grads(model, current["x"], current["y"])) / input_norms

    def sgd(m: nn.Module) -> torch.optim.SGD:
        return torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.9, nesterov=True, weight_decay=5e-4)

    reference_sgd = sgd(reference)
    _, optimizer = make_engm(model, sgd(model), gamma=gamma, variant="input-norm", scale=exact_ratio)
    for x, y in batches:
        naive_engm_step(reference, reference_sgd, x, y, gamma)
        current.update(x=x, y=y)
        cheap_backward(model, optimizer, x, y)
        optimizer.step()
        optimizer.zero_grad()
    for p_ref, p in zip(reference.parameters(), model.parameters()):
        torch.testing.assert_close(p, p_ref, rtol=0, atol=1e-10)


def test_direction_is_weighted_mean_of_per_example_gradients() -> None:
    """d = (1/B) sum_i w_i g_i with w_i = 1/max(s ||grad_x l_i||, gamma), from naive loops."""
    model = build("cnn")
    x, y = data(7)
    s = 3.0
    before = [p.detach().clone() for p in model.parameters()]
    input_norms = naive_input_norms(model, x, y)
    gamma = float((s * input_norms).median())
    per_example = naive_per_example_grads(model, x, y)
    _, optimizer = make_engm(model, torch.optim.SGD(model.parameters(), lr=1.0), gamma=gamma, variant="input-norm", scale=s)
    cheap_backward(model, optimizer, x, y)
    optimizer.step()
    weights = engm_weights(s * input_norms, gamma)
    assert 0 < optimizer.last_step.fraction_above_gamma < 1  # gamma is active for some examples only
    torch.testing.assert_close(optimizer.last_step.weights, weights, rtol=1e-12, atol=0)
    torch.testing.assert_close(optimizer.last_step.input_grad_norms, input_norms, rtol=1e-12, atol=0)
    for k, (p0, p) in enumerate(zip(before, model.parameters())):
        direction = sum(w * grads[k] for w, grads in zip(weights, per_example)) / len(x)
        torch.testing.assert_close(p0 - p.detach(), direction, rtol=0, atol=1e-12)


def test_accumulation_over_two_backward_calls_equals_one_call() -> None:
    x, y = data(3, batch=8)
    models = [build("mlp"), build("mlp")]
    optimizers = [
        make_engm(m, torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9), gamma=0.2, variant="input-norm", scale=2.0)[1]
        for m in models
    ]
    cheap_backward(models[0], optimizers[0], x, y)
    cheap_backward(models[1], optimizers[1], x[:3], y[:3])
    cheap_backward(models[1], optimizers[1], x[3:], y[3:])
    for optimizer in optimizers:
        optimizer.step()
    for p0, p1 in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p0, p1, rtol=0, atol=1e-14)
    torch.testing.assert_close(optimizers[0].last_step.weights, optimizers[1].last_step.weights)


def test_calibration_schedule_and_running_average() -> None:
    """s = r_0 at step 0, then m s + (1 - m) r at steps K, 2K; r = sum n_i / sum ||grad_x l_i|| (naive)."""
    model = build("cnn")
    momentum, every = 0.5, 2
    _, optimizer = make_engm(
        model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=1.0, variant="input-norm",
        calibrate_every=every, calibration_momentum=momentum,
    )
    expected_scale = None
    for step in range(5):
        x, y = data(20 + step)
        exact = naive_norms(naive_per_example_grads(model, x, y))
        input_norms = naive_input_norms(model, x, y)
        cheap_backward(model, optimizer, x, y)
        optimizer.step()
        optimizer.zero_grad()
        stats = optimizer.last_step
        if step % every == 0:
            ratio = float(exact.sum() / input_norms.sum())
            expected_scale = ratio if expected_scale is None else momentum * expected_scale + (1 - momentum) * ratio
            torch.testing.assert_close(stats.exact_norms, exact, rtol=1e-10, atol=0)
            xc, ec = input_norms - input_norms.mean(), exact - exact.mean()
            assert stats.pearson == pytest.approx(float((xc * ec).sum() / (xc.norm() * ec.norm())), rel=1e-10)
        else:
            assert stats.exact_norms is None and stats.pearson is None
        assert stats.scale == pytest.approx(expected_scale, rel=1e-12)
        torch.testing.assert_close(stats.per_example_norms, expected_scale * input_norms, rtol=1e-10, atol=0)
    assert [r.step for r in optimizer.calibrator.records] == [0, 2, 4]
    assert optimizer.running_pearson == pytest.approx(sum(r.pearson for r in optimizer.calibrator.records) / 3)


def test_calibration_on_the_first_m_examples() -> None:
    model = build("mlp")
    x, y = data(30)
    exact = naive_norms(naive_per_example_grads(model, x, y))[:3]
    input_norms = naive_input_norms(model, x, y)[:3]
    _, optimizer = make_engm(
        model, sgd_on(model), gamma=1.0, variant="input-norm", calibrate_every=1, calibration_examples=3
    )
    cheap_backward(model, optimizer, x, y)
    optimizer.step()
    torch.testing.assert_close(optimizer.last_step.exact_norms, exact, rtol=1e-10, atol=0)
    assert optimizer.scale == pytest.approx(float(exact.sum() / input_norms.sum()), rel=1e-10)
    assert len(optimizer.last_step.weights) == len(x)


class Counter:
    """Counts calls of torch.autograd.grad and torch.autograd.backward (which Tensor.backward calls)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: List[str] = []
        for name in ("grad", "backward"):
            original = getattr(torch.autograd, name)
            monkeypatch.setattr(torch.autograd, name, self.wrap(name, original))

    def wrap(self, name: str, original: Callable) -> Callable:
        def counted(*args, **kwargs):
            self.calls.append(name)
            return original(*args, **kwargs)

        return counted


def count_train_step(monkeypatch: pytest.MonkeyPatch, optimizer: torch.optim.Optimizer, model: nn.Module) -> List[str]:
    x, y = data(5, batch=4, shape=(1, 4, 4))
    adapter = PGDAT(eps=0.1, step_size=0.05, steps=3, generator=torch.Generator().manual_seed(0))
    with monkeypatch.context() as patch:
        counter = Counter(patch)
        train_step(model, optimizer, adapter, x, y)
    return counter.calls


def test_attack_source_uses_last_pgd_step_gradient_without_extra_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build("cnn")
    x, y = data(5, batch=4)
    _, optimizer = make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=0.5, variant="input-norm", input_norm_source="attack")
    assert optimizer.needs_input_grad is False
    calls = count_train_step(monkeypatch, optimizer, model)
    # Independently: the PGD iterate before the last sign step, from the same seeded start.
    reference = build("cnn")
    x_prev = pgd_linf(reference, x, y, eps=0.1, step_size=0.05, steps=2, generator=torch.Generator().manual_seed(0))
    x_prev.requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(reference(x_prev), y, reduction="sum"), x_prev)
    torch.testing.assert_close(optimizer.last_step.input_grad_norms, grad.flatten(1).norm(dim=1), rtol=1e-12, atol=0)
    baseline_model = build("cnn")
    baseline = count_train_step(monkeypatch, torch.optim.SGD(baseline_model.parameters(), lr=0.1), baseline_model)
    assert calls == baseline == ["grad"] * 3 + ["backward"]  # 3 PGD steps, one training backward: nothing extra


def test_recompute_source_runs_exactly_one_extra_input_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build("cnn")
    _, optimizer = make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=0.5, variant="input-norm")
    assert optimizer.needs_input_grad is True
    assert count_train_step(monkeypatch, optimizer, model) == ["grad"] * 4 + ["backward"]


@pytest.mark.parametrize("source", ["recompute", "attack"])
def test_runs_on_batchnorm_preact_resnet18(source: str) -> None:
    torch.manual_seed(0)
    model = preact_resnet18(num_classes=5, in_channels=1, norm="batch", width=2).double()
    before = [p.detach().clone() for p in model.parameters()]
    _, optimizer = make_engm(
        model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), gamma=0.5,
        variant="input-norm", input_norm_source=source, calibrate_every=2,
    )
    adapter = PGDAT(eps=0.1, step_size=0.05, steps=2)
    for seed in range(3):
        train_step(model, optimizer, adapter, *data(seed, batch=8, shape=(1, 8, 8)))
    stats = optimizer.last_step
    assert stats.exact_norms is not None and bool(torch.isfinite(stats.exact_norms).all())
    assert -1.0 <= stats.pearson <= 1.0 and stats.scale > 0
    assert all(bool(torch.isfinite(p).all()) and not torch.equal(p0, p) for p0, p in zip(before, model.parameters()))


def test_exact_norms_on_batchnorm_are_total_derivatives_of_each_loss() -> None:
    """BN in train mode: n_i = ||d l_i / d theta|| through the batch statistics (loop over i on the batch graph)."""
    torch.manual_seed(1)
    model = preact_resnet18(num_classes=5, in_channels=1, norm="batch", width=2).double()
    x, y = data(2, batch=5, shape=(1, 8, 8))
    losses = F.cross_entropy(model(x), y, reduction="none")
    params = list(model.parameters())
    loop = [torch.sqrt(sum((g**2).sum() for g in torch.autograd.grad(l, params, retain_graph=True))) for l in losses]
    batched = exact_per_example_norms(losses, params, chunk_size=2)
    torch.testing.assert_close(batched, torch.stack(loop), rtol=1e-12, atol=0)


def test_state_dict_round_trip_keeps_scale_and_momentum() -> None:
    def run(steps: range, model: nn.Module, optimizer: InputNormENGMOptimizer) -> None:
        for step in steps:
            cheap_backward(model, optimizer, *data(40 + step))
            optimizer.step()
            optimizer.zero_grad()

    def wrapped(model: nn.Module) -> InputNormENGMOptimizer:
        sgd = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        return make_engm(model, sgd, gamma=0.5, variant="input-norm", calibrate_every=3)[1]

    straight = build("mlp")
    straight_optimizer = wrapped(straight)
    run(range(5), straight, straight_optimizer)
    first = build("mlp")
    optimizer = wrapped(first)
    run(range(2), first, optimizer)
    resumed = copy.deepcopy(first)
    resumed_optimizer = wrapped(resumed)
    resumed_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    run(range(2, 5), resumed, resumed_optimizer)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert resumed_optimizer.calibrator.records == straight_optimizer.calibrator.records
    assert [r.step for r in resumed_optimizer.calibrator.records] == [0, 3]


def test_nonfinite_input_norm_raises_or_skips() -> None:
    model = build("mlp")
    x, y = data(0)
    grad = torch.ones_like(x)
    grad[2] = float("nan")
    out = ATLossOutput(per_example=F.cross_entropy(model(x), y, reduction="none"), x_adv=x, logits_adv=model(x).detach(), attack_input_grad=grad)
    _, optimizer = make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=1.0, variant="input-norm", input_norm_source="attack")
    with pytest.raises(FloatingPointError, match="on_nonfinite='skip'"):
        optimizer.backward(out.per_example, at_output=out)
    before = [p.detach().clone() for p in model.parameters()]
    skipping = InputNormENGMOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), gamma=1.0, source="attack", on_nonfinite="skip")
    skipping.backward(out.per_example, at_output=out)
    skipping.step()
    assert skipping.last_step.skipped
    assert all(torch.equal(p0, p) for p0, p in zip(before, model.parameters()))


def sgd_on(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"input_norm_source": "grad"}, "'recompute'"),
        ({"calibrate_every": 0}, "calibrate_every"),
        ({"calibrate_every": -3}, "calibrate_every"),
        ({"calibrate_every": 2.5}, "calibrate_every"),
        ({"calibrate_every": 4, "calibration_momentum": 1.0}, "calibration_momentum"),
        ({"calibrate_every": 4, "scale": 2.0}, "either fix s"),
        ({"calibrate_every": 4, "calibration_examples": 1}, "calibration_examples=32"),
        ({"scale": -1.0}, "scale=1.0"),
        ({"grad_sample_mode": "functorch"}, "leave them at their defaults"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs: dict, match: str) -> None:
    model = build("mlp")
    with pytest.raises(ValueError, match=match):
        make_engm(model, sgd_on(model), gamma=1.0, variant="input-norm", **kwargs)


def test_input_norm_arguments_without_the_variant_are_refused() -> None:
    model = build("mlp")
    with pytest.raises(ValueError, match="variant='input-norm'"):
        make_engm(model, sgd_on(model), gamma=1.0, calibrate_every=5)
    with pytest.raises(ValueError, match="'exact' or 'input-norm'"):
        make_engm(model, sgd_on(model), gamma=1.0, variant="cheap")


def test_trades_with_attack_source_is_refused() -> None:
    model = small_cnn().double()
    x, y = data(1, batch=4)
    out = TRADES(eps=0.1, step_size=0.05, steps=1)(model, x, y)
    assert out.attack_input_grad is None
    _, optimizer = make_engm(model, sgd_on(model), gamma=1.0, variant="input-norm", input_norm_source="attack")
    with pytest.raises(ValueError, match="use input_norm_source='recompute'"):
        optimizer.backward(out.per_example, at_output=out)


def test_recompute_without_a_grad_tracking_input_is_refused() -> None:
    model = build("mlp")
    x, y = data(1)
    _, optimizer = make_engm(model, sgd_on(model), gamma=1.0, variant="input-norm")
    with pytest.raises(ValueError, match="track_input_grad=True"):
        optimizer.backward(F.cross_entropy(model(x), y, reduction="none"), inputs=x)
    with pytest.raises(RuntimeError, match=r"optimizer.backward\(losses"):
        optimizer.step()
    with pytest.raises(ValueError, match="reduction='none'"):
        optimizer.backward(F.cross_entropy(model(x), y), inputs=x)
