"""The input-norm variant's fast path (``input_grad_source="attack"``): weights from the attack's last input
gradient, fixed before the training backward, which then produces ``d`` itself.

References are independent: per-example loops with ``torch.autograd.grad`` on a copy of the model, and
for BatchNorm the gradient of the weighted loss ``(1/B) sum_i w_i l_i`` in the same batch computation.
"""

from __future__ import annotations

import copy
from typing import List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engm_opacus import make_engm

B, STEP, ATTACK_STEPS = 6, 0.05, 3


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 3)).double()


def batch(seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(B, 5, generator=generator, dtype=torch.float64), torch.randint(0, 3, (B,), generator=generator)


def attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A sign-gradient attack through ``model`` by ``torch.autograd.grad``; returns ``(x_adv, x_{K-1})``:
    the last gradient is taken at ``x_{K-1}``."""
    x_adv = x.clone()
    for _ in range(ATTACK_STEPS):
        previous = x_adv.detach()
        x_adv = previous.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = (previous + STEP * grad.sign()).detach()
    return x_adv, previous


def per_example(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Tuple[List[List[torch.Tensor]], torch.Tensor, torch.Tensor]:
    """``g_i`` (parameter gradients of ``l_i``), ``n_i = ||g_i||`` and ``||grad_x l_i||`` by one autograd call per example."""
    params = list(model.parameters())
    grads, norms, input_norms = [], [], []
    for i in range(len(x)):
        xi = x[i : i + 1].clone().requires_grad_(True)
        *g, gx = torch.autograd.grad(F.cross_entropy(model(xi), y[i : i + 1]), params + [xi])
        grads.append(g)
        norms.append(torch.sqrt(sum(t.square().sum() for t in g)))
        input_norms.append(gx.norm())
    return grads, torch.stack(norms), torch.stack(input_norms)


def reference_step(reference: nn.Module, optimizer: torch.optim.Optimizer, grads, weights: torch.Tensor) -> None:
    for k, p in enumerate(reference.parameters()):
        p.grad = sum(w * g[k] for w, g in zip(weights, grads)) / len(weights)
    optimizer.step()


def train_and_compare(
    wrapped: nn.Module, optimizer, x_adv: torch.Tensor, y: torch.Tensor, reference: nn.Module, reference_optimizer,
    grads, norms: torch.Tensor, gamma: float,
) -> None:
    """One ENGM step of the script (``loss.backward(); step(); zero_grad()``) next to the reference step with
    ``w_i = 1/max(norms_i, gamma)``; the step's norms and both models' parameters must agree."""
    F.cross_entropy(wrapped(x_adv), y).backward()
    optimizer.step()
    optimizer.zero_grad()
    reference_step(reference, reference_optimizer, grads, 1.0 / norms.clamp(min=gamma))
    torch.testing.assert_close(optimizer.last_step.per_example_norms, norms, rtol=1e-10, atol=0)
    assert_same_parameters(wrapped, reference)


def sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)


def assert_same_parameters(model: nn.Module, reference: nn.Module) -> None:
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-10, atol=1e-12)


def test_fixed_scale_weights_come_from_the_attacks_last_input_gradient() -> None:
    """Three SGD steps (momentum, Nesterov, weight decay): w_i = 1/max(s m_i, gamma), m_i = B ||grad_x L_attack||_i
    = ||grad_x l_i|| at the attack's last iterate x_{K-1} (the attack's loss is a batch mean)."""
    model, (x, y) = mlp(), batch()
    reference = copy.deepcopy(model)
    reference_optimizer = sgd(reference)
    scale = 40.0 / B
    wrapped, optimizer = make_engm(
        model, sgd(model), gamma=1.2, variant="input-norm", input_grad_source="attack", input_norm_scale=scale
    )
    for _ in range(3):
        x_adv, last_iterate = attack(wrapped, x, y)
        _, _, attack_input_norms = per_example(reference, last_iterate, y)
        estimates = scale * attack_input_norms
        grads, _, _ = per_example(reference, x_adv, y)
        train_and_compare(wrapped, optimizer, x_adv, y, reference, reference_optimizer, grads, estimates, 1.2)


def test_default_calibrates_the_attack_norms_on_the_first_step_then_takes_the_fast_path() -> None:
    model, (x, y) = mlp(1), batch(1)
    reference = copy.deepcopy(model)
    reference_optimizer = sgd(reference)
    wrapped, optimizer = make_engm(model, sgd(model), gamma=0.3, variant="input-norm", input_grad_source="attack")
    scale = None
    for step in range(3):
        x_adv, last_iterate = attack(wrapped, x, y)
        _, _, attack_input_norms = per_example(reference, last_iterate, y)
        grads, exact, _ = per_example(reference, x_adv, y)
        if step == 0:
            scale = float(torch.median(exact / attack_input_norms))
            norms = exact
        else:
            norms = scale * attack_input_norms
        train_and_compare(wrapped, optimizer, x_adv, y, reference, reference_optimizer, grads, norms, 0.3)
        assert optimizer.last_step.calibrated == (step == 0)
        assert optimizer.last_step.scale == pytest.approx(scale, rel=1e-12)
    assert not wrapped.recording and wrapped.row_weights is not None  # the fast path records no layer call


@pytest.mark.parametrize("source", ["attack", "backward"])
def test_with_the_exact_per_example_ratio_supplied_it_equals_exact_engm(source: str) -> None:
    """s_i = n_i / m_i (a per-example "scale") turns the estimate into the exact norm: the update is exact ENGM's."""
    model, (x, y) = mlp(2), batch(2)
    reference = copy.deepcopy(model)
    reference_optimizer = sgd(reference)
    wrapped, optimizer = make_engm(
        model, sgd(model), gamma=0.2, variant="input-norm", input_grad_source=source, input_norm_scale=1.0
    )
    for _ in range(2):
        x_adv, last_iterate = attack(wrapped, x, y)
        grads, exact, training_input_norms = per_example(reference, x_adv, y)
        _, _, attack_input_norms = per_example(reference, last_iterate, y)
        optimizer.estimator.scale = exact / (attack_input_norms if source == "attack" else training_input_norms)
        train_and_compare(wrapped, optimizer, x_adv, y, reference, reference_optimizer, grads, exact, 0.2)


def bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4),
        nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3),
    ).double()


def test_batchnorm_fast_path_is_the_gradient_of_the_weighted_loss_in_the_same_batch() -> None:
    """On the fast path each example's loss term is weighted: d = grad (1/B) sum_i w_i l_i, with BatchNorm's batch
    statistics as in the training forward (exact ENGM's per-copy g_i differ from grad l_i under BatchNorm)."""
    model = bn_net()
    reference = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(3)
    x, y = torch.rand(B, 1, 6, 6, generator=generator, dtype=torch.float64), torch.randint(0, 3, (B,), generator=generator)
    scale, gamma, lr = 5.0 / B, 0.9, 0.1
    wrapped, optimizer = make_engm(
        model, torch.optim.SGD(model.parameters(), lr=lr), gamma=gamma, variant="input-norm", input_grad_source="attack",
        input_norm_scale=scale,
    )
    x_adv, last_iterate = attack(wrapped, x, y)
    reference.train()
    probe = last_iterate.clone().requires_grad_(True)
    (attack_grad,) = torch.autograd.grad(F.cross_entropy(reference(probe), y), probe)
    weights = 1.0 / (scale * B * attack_grad.flatten(1).norm(dim=1)).clamp(min=gamma)
    losses = F.cross_entropy(reference(x_adv), y, reduction="none")
    expected = torch.autograd.grad((weights * losses).mean(), list(reference.parameters()))
    F.cross_entropy(wrapped(x_adv), y).backward()
    optimizer.step()
    for p, q, g in zip(model.parameters(), reference.parameters(), expected):
        torch.testing.assert_close(p.detach(), q.detach() - lr * g, rtol=1e-10, atol=1e-12)
    assert 0.0 < optimizer.last_step.fraction_above_gamma < 1.0


def test_two_forwards_in_one_loss_share_the_rows_weights() -> None:
    """A TRADES-shaped loss (clean and adversarial calls): both calls' rows get w_i; d = (1/B) sum_i w_i grad l_i."""
    model, (x, y) = mlp(4), batch(4)
    reference = copy.deepcopy(model)
    scale, gamma, lr = 30.0 / B, 0.3, 0.1
    wrapped, optimizer = make_engm(
        model, torch.optim.SGD(model.parameters(), lr=lr), gamma=gamma, variant="input-norm", input_grad_source="attack",
        input_norm_scale=scale,
    )
    x_adv, last_iterate = attack(wrapped, x, y)
    _, _, attack_input_norms = per_example(reference, last_iterate, y)
    weights = 1.0 / (scale * attack_input_norms).clamp(min=gamma)

    def two_term(net: nn.Module, reduction: str) -> torch.Tensor:
        clean = net(x)
        kl = F.kl_div(F.log_softmax(net(x_adv), 1), F.softmax(clean, 1), reduction="none").sum(1)
        per_row = F.cross_entropy(clean, y, reduction="none") + 6.0 * kl
        return per_row.mean() if reduction == "mean" else per_row

    expected = torch.autograd.grad((weights * two_term(reference, "none")).mean(), list(reference.parameters()))
    two_term(wrapped, "mean").backward()
    optimizer.step()
    for p, q, g in zip(model.parameters(), reference.parameters(), expected):
        torch.testing.assert_close(p.detach(), q.detach() - lr * g, rtol=1e-10, atol=1e-12)


def count_backward_passes(monkeypatch: pytest.MonkeyPatch) -> List[int]:
    """Count every run of the autograd engine (``loss.backward()`` and ``torch.autograd.grad`` alike)."""
    calls: List[int] = []
    original = torch.autograd._engine_run_backward

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "_engine_run_backward", counting)
    return calls


@pytest.mark.parametrize(
    "options",
    [None, {}, {"variant": "input-norm"}, {"variant": "input-norm", "input_grad_source": "attack"}],
    ids=["msgd", "exact", "input-norm-backward", "input-norm-attack"],
)
def test_no_backward_beyond_the_scripts_own(monkeypatch: pytest.MonkeyPatch, options) -> None:
    """An AT step with a K-step attack runs the engine K + 1 times under MSGD and under every ENGM variant
    (calibration steps and fast steps alike): the weighted gradient is never a second backward."""
    model, (x, y) = mlp(5), batch(5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if options is not None:
        model, optimizer = make_engm(model, optimizer, gamma=0.5, **options)
    calls = count_backward_passes(monkeypatch)
    for step in range(3):  # input-norm: step 0 calibrates, steps 1-2 do not
        before = len(calls)
        x_adv, _ = attack(model, x, y)
        F.cross_entropy(model(x_adv), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        assert len(calls) - before == ATTACK_STEPS + 1, step


def fast_path_pair(seed: int = 6):
    model, (x, y) = mlp(seed), batch(seed)
    wrapped, optimizer = make_engm(
        model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=0.5, variant="input-norm", input_grad_source="attack",
        input_norm_scale=10.0,
    )
    return wrapped, optimizer, x, y


def test_training_without_an_attack_gradient_is_refused() -> None:
    wrapped, optimizer, x, y = fast_path_pair()
    with pytest.raises(RuntimeError, match="no attack input gradient on 6 rows came before it.*input_grad_source='backward'"):
        F.cross_entropy(wrapped(x), y).backward()


def test_an_attack_on_other_rows_is_not_paired() -> None:
    wrapped, optimizer, x, y = fast_path_pair()
    attack(wrapped, x[:4], y[:4])
    with pytest.raises(RuntimeError, match="no attack input gradient on 6 rows"):
        F.cross_entropy(wrapped(x), y).backward()


def test_a_training_input_that_requires_grad_is_refused_at_step() -> None:
    """Such a forward counts as an attack's and is not weighted: step() refuses instead of a wrong update."""
    wrapped, optimizer, x, y = fast_path_pair()
    x_adv, _ = attack(wrapped, x, y)
    F.cross_entropy(wrapped(x_adv.requires_grad_(True)), y).backward()
    with pytest.raises(RuntimeError, match="through a forward whose rows ENGM did not weight.*x_adv.detach"):
        optimizer.step()


def test_a_loss_backward_attack_cleared_by_zero_grad_is_fine_and_one_left_in_p_grad_is_refused() -> None:
    wrapped, optimizer, x, y = fast_path_pair()
    delta = torch.zeros_like(x, requires_grad=True)
    F.cross_entropy(wrapped(x + delta), y).backward()  # Rice et al.'s attack: loss.backward(), then delta.grad
    assert delta.grad is not None
    optimizer.zero_grad()
    F.cross_entropy(wrapped((x + delta).detach()), y).backward()
    optimizer.step()  # fine: the attack's p.grad was cleared
    optimizer.zero_grad()
    delta = torch.zeros_like(x, requires_grad=True)
    F.cross_entropy(wrapped(x + delta), y).backward()
    F.cross_entropy(wrapped((x + delta).detach()), y).backward()
    with pytest.raises(RuntimeError, match="through a forward whose rows ENGM did not weight"):
        optimizer.step()


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(7)

    def forward(self, x: torch.Tensor):
        return self.net(x), x.sum()


def test_a_model_returning_a_tuple_is_refused_on_the_fast_path() -> None:
    model = TupleOut()
    x, y = batch(7)
    wrapped, optimizer = make_engm(
        model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=0.5, variant="input-norm", input_grad_source="attack",
        input_norm_scale=10.0,
    )
    with pytest.raises(TypeError, match="returned a tuple.*input_grad_source='backward'"):
        wrapped(x)


def test_a_step_forgets_its_attack_gradient() -> None:
    """The next training forward without an attack of its own is not paired with an old batch's norms."""
    wrapped, optimizer, x, y = fast_path_pair()
    x_adv, _ = attack(wrapped, x, y)
    F.cross_entropy(wrapped(x_adv), y).backward()
    optimizer.step()
    optimizer.zero_grad()
    with pytest.raises(RuntimeError, match="no attack input gradient on 6 rows"):
        F.cross_entropy(wrapped(x), y).backward()


def test_a_two_term_loss_with_an_input_that_requires_grad_is_refused() -> None:
    """TRADES with x_adv not detached: the KL term's call is an attack-style forward, its gradient unweighted."""
    wrapped, optimizer, x, y = fast_path_pair()
    x_adv, _ = attack(wrapped, x, y)
    x_adv.requires_grad_(True)
    clean = wrapped(x)
    loss = F.cross_entropy(clean, y) + F.kl_div(F.log_softmax(wrapped(x_adv), 1), F.softmax(clean, 1), reduction="batchmean")
    loss.backward()
    with pytest.raises(RuntimeError, match="through a forward whose rows ENGM did not weight"):
        optimizer.step()


def test_skipped_steps_without_zero_grad_count_each_backward_once() -> None:
    """Virtual steps (Opacus's signal_skip_step) with or without zero_grad between the micro-batches: the same update."""
    results = []
    for clear_between in (True, False):
        wrapped, optimizer, x, y = fast_path_pair(8)
        for half, do_skip in ((slice(0, 3), True), (slice(3, 6), False)):
            x_adv, _ = attack(wrapped, x[half], y[half])
            F.cross_entropy(wrapped(x_adv), y[half]).backward()
            optimizer.signal_skip_step(do_skip=do_skip)
            optimizer.step()
            if clear_between or not do_skip:
                optimizer.zero_grad()
        results.append([p.detach().clone() for p in wrapped.parameters()])
    for p, q in zip(*results):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_a_non_finite_gradient_on_the_fast_path_follows_on_nonfinite(policy: str) -> None:
    model, (x, y) = mlp(9), batch(9)
    wrapped, optimizer = make_engm(
        model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=0.5, variant="input-norm", input_grad_source="attack",
        input_norm_scale=1.0, on_nonfinite=policy,
    )
    before = [p.detach().clone() for p in model.parameters()]
    x_adv, _ = attack(wrapped, x, y)
    (F.cross_entropy(wrapped(x_adv), y) * float("inf")).backward()
    if policy == "raise":
        with pytest.raises(FloatingPointError, match="Non-finite gradient.*on_nonfinite='skip'"):
            optimizer.step()
        return
    optimizer.step()
    assert optimizer.last_step.skipped
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q)


def test_float16_output_gradients_are_scaled_without_overflow() -> None:
    """w_i * B = 128 / 1e-3 exceeds float16's range; the rows are scaled in float32 and cast back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 3))
    x, y = torch.rand(128, 5), torch.randint(0, 3, (128,))
    wrapped, optimizer = make_engm(
        model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=1e-3, variant="input-norm", input_grad_source="attack",
        input_norm_scale=1e-6,
    )
    probe = x.clone().requires_grad_(True)
    torch.autograd.grad(F.cross_entropy(wrapped(probe), y), probe)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(wrapped(x), y)
    loss.backward()
    optimizer.step()
    assert not optimizer.last_step.skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_refused_option_leaves_the_model_unwrapped() -> None:
    model = mlp(10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for bad in ({"input_grad_source": "attak"}, {"on_nonfinite": "ignore"}):
        with pytest.raises(ValueError, match="input_grad_source must be one of|on_nonfinite must be"):
            make_engm(model, optimizer, gamma=1.0, variant="input-norm", **bad)
    make_engm(model, optimizer, gamma=1.0, variant="input-norm", input_grad_source="attack")  # the corrected call works


def test_loading_a_checkpoint_keeps_the_fixed_settings_given_to_make_engm() -> None:
    model, (x, y) = mlp(11), batch(11)
    wrapped, optimizer = make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=0.5, variant="input-norm")
    F.cross_entropy(wrapped(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()
    state = optimizer.state_dict()
    other = mlp(11)
    _, fixed = make_engm(other, torch.optim.SGD(other.parameters(), lr=0.1), gamma=0.01, variant="input-norm", input_norm_scale=5.0)
    fixed.load_state_dict(state)
    assert fixed.gamma == 0.01 and fixed.estimator.scale == 5.0 and fixed.estimator.steps == 1


def test_a_resumed_optimizer_continues_with_the_calibrated_scale() -> None:
    model, (x, y) = mlp(12), batch(12)
    wrapped, optimizer = make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=0.5, variant="input-norm")
    F.cross_entropy(wrapped(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()
    other = mlp(12)
    other.load_state_dict(model.state_dict())
    twin, resumed = make_engm(other, torch.optim.SGD(other.parameters(), lr=0.1), gamma=0.5, variant="input-norm")
    resumed.load_state_dict(optimizer.state_dict())
    assert (resumed.estimator.scale, resumed.estimator.steps) == (optimizer.estimator.scale, 1)
    for net, opt in ((wrapped, optimizer), (twin, resumed)):
        F.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert not resumed.last_step.calibrated
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)
