"""Reference-style script shapes stay exact under ``make_engm`` (float64, 1e-10 against the naive step).

Attacks by ``autograd.grad`` (eval) and Rice-style ``loss.backward()`` + ``delta.grad`` (train,
``zero_grad`` between the training forward and backward); eval-mode probes between forward and
backward; gradient accumulation; Opacus ``BatchMemoryManager``; LR schedulers;
parameter groups; ``state_dict`` round trips. (GradScaler and autocast: ``test_exact_amp.py``.)
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import nets
from tests.helpers.compare import (
    STEPS,
    assert_same_tensors,
    assert_stats,
    engm_sgd,
    image_batches,
    pick_gamma,
    run_and_compare,
    sgd_hyper,
)
from tests.helpers.naive import per_example_grads_copies, per_example_grads_loop
from tests.helpers.steps import (
    ce_loss,
    library_step,
    naive_step,
    pgd_autograd_eval,
    pgd_autograd_train,
    pgd_rice_train,
    trades_attack_eval,
    trades_loss,
)

PREACT = {
    "batchnorm": (nets.preact_batchnorm, per_example_grads_copies),
    "groupnorm": (nets.preact_groupnorm, per_example_grads_loop),
}


# ---------------------------------------------------------------- attack styles
@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
@pytest.mark.parametrize("norm", sorted(PREACT))
def test_autograd_grad_attack_in_eval_mode(norm: str, nesterov: bool) -> None:
    build, reference = PREACT[norm]
    run_and_compare(build, image_batches(4), pgd_autograd_eval, ce_loss, reference, hyper=sgd_hyper(nesterov))


@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
@pytest.mark.parametrize("norm", sorted(PREACT))
def test_rice_style_backward_attack_in_train_mode_then_zero_grad_before_training_backward(norm: str, nesterov: bool) -> None:
    """Rice et al. train_cifar.py: attack by ``loss.backward()`` in train mode (BatchNorm running
    statistics move, ``p.grad`` fills up), ``robust_loss = criterion(model(x_adv), y)``,
    ``opt.zero_grad(); robust_loss.backward(); opt.step()``."""
    build, reference = PREACT[norm]
    run_and_compare(
        build, image_batches(4), pgd_rice_train, ce_loss, reference, hyper=sgd_hyper(nesterov), zero_grad_after_forward=True
    )


@pytest.mark.parametrize("norm", sorted(PREACT))
def test_autograd_grad_attack_in_train_mode(norm: str) -> None:
    build, reference = PREACT[norm]
    run_and_compare(build, image_batches(4), pgd_autograd_train, trades_loss, reference, hyper=sgd_hyper(True))


def test_script_calling_the_plain_model_object_is_exact() -> None:
    """Hooks live on the submodules: calling the model passed to make_engm equals calling the returned one."""
    run_and_compare(
        nets.preact_batchnorm, image_batches(4), pgd_rice_train, ce_loss, per_example_grads_copies,
        hyper=sgd_hyper(True), zero_grad_after_forward=True, call_plain_module=True,
    )


# ---------------------------------------------------------------- probes between forward and backward
def _autograd_probe(model: torch.nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> None:
    """Eval-mode logging attack between the training forward and backward: autograd.grad w.r.t. the
    input (reaches no parameter), plus a no_grad eval forward."""
    model.eval()
    probe = x_adv.detach().clone().requires_grad_()
    (grad,) = torch.autograd.grad(F.cross_entropy(model(probe), y), probe)
    assert torch.isfinite(grad).all()
    with torch.no_grad():
        model(x)


@pytest.mark.parametrize("loss", ["ce", "trades"])
@pytest.mark.parametrize("norm", sorted(PREACT))
def test_eval_mode_autograd_probe_between_forward_and_backward(norm: str, loss: str) -> None:
    build, reference = PREACT[norm]
    attack, loss_fn = {"ce": (pgd_autograd_eval, ce_loss), "trades": (trades_attack_eval, trades_loss)}[loss]
    run_and_compare(build, image_batches(4), attack, loss_fn, reference, hyper=sgd_hyper(True), probe=_autograd_probe)


def _train_mode_probe(model: torch.nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> None:
    """Train-mode input-gradient probe (moves BatchNorm running statistics, reaches no parameter)."""
    model.train()
    probe = x.detach().clone().requires_grad_()
    (grad,) = torch.autograd.grad(F.cross_entropy(model(probe), y), probe)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("norm", sorted(PREACT))
def test_train_mode_autograd_probe_between_forward_and_backward(norm: str) -> None:
    build, reference = PREACT[norm]
    run_and_compare(
        build, image_batches(4), pgd_autograd_eval, trades_loss, reference, hyper=sgd_hyper(False),
        probe=_train_mode_probe, probe_on_reference=True,
    )


@pytest.mark.parametrize("clear", ["optimizer", "model"])
@pytest.mark.parametrize("norm", sorted(PREACT))
def test_eval_mode_backward_probe_then_zero_grad_before_training_forward_is_harmless(norm: str, clear: str) -> None:
    build, reference = PREACT[norm]

    def backward_probe(model, optimizer, batch):
        x, x_adv, y = batch
        model.eval()
        F.cross_entropy(model(x_adv), y).backward()
        (optimizer if clear == "optimizer" else model).zero_grad()

    run_and_compare(build, image_batches(4), pgd_autograd_eval, ce_loss, reference, hyper=sgd_hyper(False), pre_forward=backward_probe)


def test_eval_mode_backward_probe_without_zero_grad_counts_like_p_grad() -> None:
    """A probe's ``loss.backward()`` between the training forward and backward adds to ``p.grad``; its
    records add its B eval-mode examples (after the training forward moved the running statistics):
    N = 2B. The norms are compared as sets (the contract does not fix their order)."""
    batches = image_batches(4)
    hyper = sgd_hyper(True)

    def eval_ce(model, x_adv, y):
        model.eval()
        loss = F.cross_entropy(model(x_adv), y)
        model.train()
        return loss

    def with_probe(model, loss_fn, x, x_adv, y):
        training = per_example_grads_copies(model, loss_fn, x, x_adv, y)
        return training + per_example_grads_copies(model, eval_ce, x_adv, y)

    def backward_probe(model, x, x_adv, y):
        eval_ce(model, x_adv, y).backward()

    gamma = pick_gamma(nets.preact_batchnorm, batches[0], pgd_autograd_eval, ce_loss, with_probe)
    model, optimizer = engm_sgd(nets.preact_batchnorm(), hyper, gamma)
    reference = nets.preact_batchnorm()
    sgd = torch.optim.SGD(reference.parameters(), **hyper)
    for step, data in enumerate(batches):
        library_step(model, optimizer, data, pgd_autograd_eval, ce_loss, probe=backward_probe)
        norms, _ = naive_step(reference, sgd, data, pgd_autograd_eval, ce_loss, gamma, with_probe)
        actual = torch.as_tensor(optimizer.last_step.per_example_norms).double()
        torch.testing.assert_close(actual.sort().values, norms.sort().values, atol=1e-10, rtol=1e-10)
        assert_same_tensors(model.parameters(), reference.parameters(), f"step {step} parameters")
        assert_same_tensors(model.buffers(), reference.buffers(), f"step {step} buffers")


# ---------------------------------------------------------------- accumulation, BatchMemoryManager
@pytest.mark.parametrize("net", ["mlp", "groupnorm_cnn"])
def test_two_backward_calls_on_halves_equal_one_step_on_the_whole_batch(net: str) -> None:
    build = {"mlp": nets.mlp, "groupnorm_cnn": nets.groupnorm_cnn}[net]
    batches = image_batches(6)
    hyper = sgd_hyper(True)
    gamma = pick_gamma(build, batches[0], pgd_autograd_eval, ce_loss, per_example_grads_loop)
    halves, halves_opt = engm_sgd(build(), hyper, gamma)
    whole, whole_opt = engm_sgd(build(), hyper, gamma)
    reference = build()
    sgd = torch.optim.SGD(reference.parameters(), **hyper)
    for step, (x, y, start) in enumerate(batches):
        _, x_adv, _ = pgd_autograd_eval(halves, x, y, start)
        for rows in (slice(0, 3), slice(3, 6)):
            ce_loss(halves, x[rows], x_adv[rows], y[rows]).backward()
        halves_opt.step()
        halves_opt.zero_grad()
        ce_loss(whole, *pgd_autograd_eval(whole, x, y, start)).backward()
        whole_opt.step()
        whole_opt.zero_grad()
        norms, weights = naive_step(reference, sgd, (x, y, start), pgd_autograd_eval, ce_loss, gamma, per_example_grads_loop)
        assert_stats(halves_opt.last_step, norms, weights, gamma, step)
        assert_stats(whole_opt.last_step, norms, weights, gamma, step)
        assert_same_tensors(halves.parameters(), reference.parameters(), f"step {step} halves")
        assert_same_tensors(whole.parameters(), reference.parameters(), f"step {step} whole")


def test_accumulation_with_batchnorm_concatenates_the_per_call_examples() -> None:
    """Each backward() is a mean over its own rows: g_i = B_call * dL_call/dtheta^(i), N = 6."""
    batches = image_batches(6)
    hyper = sgd_hyper(False)
    halves_rows = (slice(0, 3), slice(3, 6))

    def per_half_reference(model, loss_fn, x, x_adv, y):
        return [g for rows in halves_rows for g in per_example_grads_copies(model, loss_fn, x[rows], x_adv[rows], y[rows])]

    gamma = pick_gamma(nets.preact_batchnorm, batches[0], pgd_autograd_eval, ce_loss, per_half_reference)
    model, optimizer = engm_sgd(nets.preact_batchnorm(), hyper, gamma)
    reference = nets.preact_batchnorm()
    sgd = torch.optim.SGD(reference.parameters(), **hyper)
    for step, (x, y, start) in enumerate(batches):
        _, x_adv, _ = pgd_autograd_eval(model, x, y, start)
        for rows in halves_rows:
            ce_loss(model, x[rows], x_adv[rows], y[rows]).backward()
        optimizer.step()
        optimizer.zero_grad()
        norms, weights = naive_step(reference, sgd, (x, y, start), pgd_autograd_eval, ce_loss, gamma, per_half_reference)
        assert_stats(optimizer.last_step, norms, weights, gamma, step)
        assert_same_tensors(model.parameters(), reference.parameters(), f"step {step} parameters")
        assert_same_tensors(model.buffers(), reference.buffers(), f"step {step} buffers")


def test_batch_memory_manager_equals_one_step_on_the_logical_batch() -> None:
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    logical, physical = 5, 2  # physical batches of 2, 2, 1 rows per logical batch
    batches = image_batches(logical)
    dataset = TensorDataset(*(torch.cat(parts) for parts in zip(*batches)))
    hyper = sgd_hyper(True)
    gamma = pick_gamma(nets.mlp, batches[0], pgd_autograd_eval, ce_loss, per_example_grads_loop)
    model, optimizer = engm_sgd(nets.mlp(), hyper, gamma)
    reference = nets.mlp()
    sgd = torch.optim.SGD(reference.parameters(), **hyper)
    seen, steps = 0, 0
    loader = DataLoader(dataset, batch_size=logical, shuffle=False)
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical, optimizer=optimizer) as memory_safe:
        for x, y, start in memory_safe:
            assert len(x) <= physical
            batch = pgd_autograd_eval(model, x, y, start)
            ce_loss(model, *batch).backward()
            optimizer.step()
            optimizer.zero_grad()
            seen += len(x)
            if seen % logical == 0:
                norms, weights = naive_step(reference, sgd, batches[steps], pgd_autograd_eval, ce_loss, gamma, per_example_grads_loop)
                assert_stats(optimizer.last_step, norms, weights, gamma, steps)
                assert_same_tensors(model.parameters(), reference.parameters(), f"logical step {steps}")
                steps += 1
            else:
                assert_same_tensors(model.parameters(), reference.parameters(), f"inside logical step {steps}")
    assert steps == STEPS


def _head_and_rest(model: torch.nn.Module) -> list[dict]:
    head = {id(p) for p in model.linear.parameters()}
    rest = [p for p in model.parameters() if id(p) not in head]
    return [{"params": rest}, {"params": list(model.linear.parameters()), "lr": 0.05, "weight_decay": 0.0, "momentum": 0.5}]


@pytest.mark.parametrize("held", ["param_groups", "head_only"])
def test_optimizer_param_groups_and_subsets(held: str) -> None:
    """Per-group SGD hyperparameters apply to d; the norms cover only the parameters the optimizer
    holds (``head_only``: the BatchNorm net's other parameters still require grad)."""
    optimizer_params = _head_and_rest if held == "param_groups" else (lambda model: model.linear.parameters())
    run_and_compare(
        nets.preact_batchnorm, image_batches(4), pgd_autograd_eval, ce_loss, per_example_grads_copies,
        hyper=sgd_hyper(True), optimizer_params=optimizer_params,
    )


# ---------------------------------------------------------------- LR scheduler
def test_step_lr_scheduler_on_the_returned_optimizer_changes_the_lr_used() -> None:
    def step_lr(optimizer):
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)

    _, optimizer, _, gamma = run_and_compare(
        nets.preact_batchnorm, image_batches(4), pgd_autograd_eval, ce_loss, per_example_grads_copies,
        hyper=sgd_hyper(True), scheduler=step_lr,
    )
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**STEPS)
    assert optimizer.gamma == gamma


# ---------------------------------------------------------------- state_dict
def test_state_dict_loads_into_the_plain_model_and_back() -> None:
    batches = image_batches(4, steps=4)
    model, optimizer = engm_sgd(nets.preact_batchnorm(), sgd_hyper(True), 1.0)
    for data in batches[:2]:
        ce_loss(model, *pgd_autograd_eval(model, *data)).backward()
        optimizer.step()
        optimizer.zero_grad()
    plain_keys = list(nets.preact_batchnorm().state_dict())
    state = model.state_dict()
    assert list(state) == plain_keys
    plain = nets.preact_batchnorm(seed=1)
    plain.load_state_dict(state, strict=True)
    x = batches[3][0]
    model.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)
    other = nets.preact_batchnorm(seed=2)
    model.load_state_dict(copy.deepcopy(other.state_dict()), strict=True)
    other.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), other(x), rtol=0, atol=0)
    loaded = copy.deepcopy(other.state_dict())
    # training goes on after the load
    model.train()
    ce_loss(model, *pgd_autograd_eval(model, *batches[2])).backward()
    optimizer.step()
    optimizer.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    standard = model.to_standard_module()
    assert list(standard.state_dict()) == plain_keys
    assert_same_tensors(standard.state_dict().values(), model.state_dict().values(), "to_standard_module")
    assert any(not torch.equal(a, b) for a, b in zip(standard.state_dict().values(), loaded.values()))
    # the unwrapped model has no hooks: an ENGM step would be plain SGD, so it is refused
    ce_loss(standard, *pgd_autograd_eval(standard, *batches[3])).backward()
    with pytest.raises(RuntimeError, match="hooks are off"):
        optimizer.step()
