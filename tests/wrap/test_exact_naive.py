"""Exact ENGM (``make_engm``) equals an independent naive computation, float64 at 1e-10.

Every test trains 3 steps (momentum 0.9, weight decay, nesterov on and off) with gamma between
the per-example norms, and compares parameters, BatchNorm buffers and ``optimizer.last_step``
after each step with the references of ``tests.helpers.naive``: a per-example autograd loop for
models without BatchNorm, per-example parameter copies for BatchNorm models.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from tests.helpers import nets
from tests.helpers.compare import STEPS, TOL, assert_same_tensors, image_batches, run_and_compare, sgd_hyper
from tests.helpers.naive import naive_norms, per_example_grads_copies, per_example_grads_loop, trainable
from tests.helpers.steps import (
    EPS,
    ce_loss,
    no_attack,
    pgd_autograd_eval,
    pgd_rice_train,
    trades_attack_eval,
    trades_loss,
)

NETS_WITHOUT_BATCHNORM = {
    "mlp": nets.mlp,
    "groupnorm_cnn": nets.groupnorm_cnn,
    "preact_groupnorm": nets.preact_groupnorm,
}
LOSSES = {"ce": (pgd_autograd_eval, ce_loss), "trades": (trades_attack_eval, trades_loss)}


# ---------------------------------------------------------------- the references agree with each other
@pytest.mark.parametrize("net", ["mlp", "preact_groupnorm", "padded_reflect"])
def test_reference_copies_equal_autograd_loop_without_batchnorm(net: str) -> None:
    build = {"mlp": nets.mlp, "preact_groupnorm": nets.preact_groupnorm, "padded_reflect": lambda: nets.padded_conv("reflect")}[net]
    model = build()
    x, y, start = image_batches(4, steps=1)[0]
    batch = trades_attack_eval(model, x, y, start)
    loop = per_example_grads_loop(model, trades_loss, *batch)
    copies = per_example_grads_copies(model, trades_loss, *batch)
    for i, (a, b) in enumerate(zip(loop, copies)):
        assert_same_tensors(b, a, f"example {i}")


def test_reference_copies_sum_to_batch_gradient_with_batchnorm() -> None:
    model = nets.preact_batchnorm()
    plain = copy.deepcopy(model)
    x, y, start = image_batches(4, steps=1)[0]
    batch = trades_attack_eval(model, x, y, start)
    copies = per_example_grads_copies(model, trades_loss, *batch)
    trades_loss(plain, *batch).backward()
    summed = [sum(g[k] for g in copies) for k in range(len(copies[0]))]
    assert_same_tensors(summed, [4 * p.grad for p in trainable(plain)], "sum_i g_i vs B * grad")
    # running statistics updated exactly as by one real forward (model called twice by TRADES)
    assert_same_tensors(model.buffers(), plain.buffers(), "buffers")
    # BatchNorm makes the examples interact: g_i is not grad l_i
    loop = per_example_grads_loop(nets.preact_batchnorm(), trades_loss, *batch)
    assert not torch.allclose(naive_norms(loop), naive_norms(copies))


# ---------------------------------------------------------------- losses x nets x nesterov
@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("net", sorted(NETS_WITHOUT_BATCHNORM))
def test_mean_loss_matches_autograd_loop(net: str, loss: str, nesterov: bool) -> None:
    attack, loss_fn = LOSSES[loss]
    run_and_compare(
        NETS_WITHOUT_BATCHNORM[net], image_batches(4), attack, loss_fn, per_example_grads_loop, hyper=sgd_hyper(nesterov)
    )


@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_batchnorm_preact_matches_parameter_copies(loss: str, nesterov: bool) -> None:
    attack, loss_fn = LOSSES[loss]
    run_and_compare(nets.preact_batchnorm, image_batches(4), attack, loss_fn, per_example_grads_copies, hyper=sgd_hyper(nesterov))


BATCHNORM_VARIANTS = {
    "no_running_stats": {"track_running_stats": False},
    "cumulative_average": {"momentum": None},
    "no_affine": {"affine": False},
}


@pytest.mark.parametrize("attack", ["trades_eval", "rice_train"])
@pytest.mark.parametrize("variant", sorted(BATCHNORM_VARIANTS))
def test_batchnorm_options_match_parameter_copies(variant: str, attack: str) -> None:
    """BatchNorm1d/2d with batch statistics in eval mode too, a cumulative average, or no affine."""
    kw = BATCHNORM_VARIANTS[variant]
    prepare, loss_fn = {"trades_eval": (trades_attack_eval, trades_loss), "rice_train": (pgd_rice_train, ce_loss)}[attack]
    run_and_compare(
        lambda: nets.batchnorm_variant(**kw), image_batches(4), prepare, loss_fn, per_example_grads_copies,
        hyper=sgd_hyper(True), zero_grad_after_forward=True,
    )


def _eval_mode_ce(model: torch.nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.eval()
    return F.cross_entropy(model(x_adv), y)


def test_training_step_in_eval_mode_batchnorm_matches_parameter_copies() -> None:
    """Fine-tuning with frozen running statistics: the whole step in eval mode (BatchNorm is affine)."""
    run_and_compare(nets.preact_batchnorm, image_batches(4), pgd_autograd_eval, _eval_mode_ce, per_example_grads_copies, hyper=sgd_hyper(True))


def test_dampening_matches_autograd_loop() -> None:
    run_and_compare(
        nets.mlp, image_batches(4), pgd_autograd_eval, ce_loss, per_example_grads_loop,
        hyper=sgd_hyper(False, dampening=0.3),
    )


def _sum_ce(model: torch.nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x_adv), y, reduction="sum")


def test_sum_reduction_batchnorm_matches_parameter_copies() -> None:
    def reference(model, loss_fn, *batch):
        return per_example_grads_copies(model, loss_fn, *batch, scale=1.0)

    run_and_compare(
        nets.preact_batchnorm, image_batches(4), pgd_autograd_eval, _sum_ce, reference,
        hyper=sgd_hyper(True), engm_kwargs={"loss_reduction": "sum"},
    )


# ---------------------------------------------------------------- layers
@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular", "zeros"])
def test_conv_padding_mode_matches_autograd_loop(padding_mode: str) -> None:
    run_and_compare(
        lambda: nets.padded_conv(padding_mode), image_batches(4), pgd_autograd_eval, ce_loss, per_example_grads_loop,
        hyper=sgd_hyper(True),
    )


def _token_batches(batch: int) -> list[tuple[torch.Tensor, ...]]:
    """Tokens (first one of every row is id 0, the padding id when one is set), features, labels, start."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        tokens, features, y = nets.tokens_and_features(batch, generator)
        tokens[:, 0] = 0
        start = (torch.rand(features.shape, generator=generator, dtype=features.dtype) * 2 - 1) * EPS
        out.append((tokens, features, y, start))
    return out


def _attack_features(model, tokens, features, y, start):
    """PGD on the float features only (eval mode, autograd.grad); the token ids stay."""
    model.eval()
    adv = features + start
    for _ in range(2):
        adv = adv.detach().requires_grad_()
        (grad,) = torch.autograd.grad(F.cross_entropy(model(tokens, adv), y), adv)
        adv = features + torch.clamp(adv.detach() + 0.04 * grad.sign() - features, -EPS, EPS)
    model.train()
    return tokens, features, adv.detach(), y


def _embedding_trades(model, tokens, features, features_adv, y):
    logits, logits_adv = model(tokens, features), model(tokens, features_adv)
    kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1), reduction="batchmean")
    return F.cross_entropy(logits, y) + 6.0 * kl


@pytest.mark.parametrize("padding_idx", [None, 0], ids=["plain", "padding_idx"])
def test_embedding_off_float_input_path_matches_autograd_loop(padding_idx: int | None) -> None:
    run_and_compare(
        lambda: nets.embedding_net(padding_idx=padding_idx), _token_batches(4), _attack_features, _embedding_trades,
        per_example_grads_loop, hyper=sgd_hyper(False),
    )


@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
def test_frozen_parameters_stay_and_are_left_out_of_the_norms(nesterov: bool) -> None:
    frozen_before = [p.detach().clone() for p in nets.frozen_net().parameters() if not p.requires_grad]
    model, _, _, _ = run_and_compare(
        nets.frozen_net, image_batches(4), pgd_autograd_eval, ce_loss, per_example_grads_loop, hyper=sgd_hyper(nesterov)
    )
    frozen_after = [p for p in model.parameters() if not p.requires_grad]
    assert_same_tensors(frozen_after, frozen_before, "frozen parameters")


def test_frozen_custom_layer_is_accepted() -> None:
    run_and_compare(
        lambda: nets.with_custom_layer(trainable=False), image_batches(4), no_attack, ce_loss, per_example_grads_loop,
        hyper=sgd_hyper(False),
    )


# ---------------------------------------------------------------- facts of the method
@pytest.mark.parametrize("net", ["mlp", "preact_batchnorm"])
def test_gamma_above_every_norm_is_msgd_with_lr_over_gamma(net: str) -> None:
    """gamma >= max n_i: d = p.grad / gamma, i.e. the g_i of one backward sum to B * p.grad.

    SGD semantics on d = grad/gamma (weight decay wd, lr) equal SGD on grad with lr/gamma and
    weight decay wd*gamma, momentum and nesterov unchanged.
    """
    from engm_opacus import make_engm

    build = {"mlp": nets.mlp, "preact_batchnorm": nets.preact_batchnorm}[net]
    batches = image_batches(4)
    gamma = 50.0
    hyper = sgd_hyper(True)
    model = build()
    model, optimizer = make_engm(model, torch.optim.SGD(model.parameters(), **hyper), gamma=gamma)
    plain = build()
    msgd = torch.optim.SGD(
        plain.parameters(), **{**hyper, "lr": hyper["lr"] / gamma, "weight_decay": hyper["weight_decay"] * gamma}
    )
    for step, (x, y, start) in enumerate(batches):
        for m, opt in ((model, optimizer), (plain, msgd)):
            batch = pgd_autograd_eval(m, x, y, start)
            ce_loss(m, *batch).backward()
            opt.step()
            opt.zero_grad()
        assert float(torch.as_tensor(optimizer.last_step.per_example_norms).max()) < gamma
        assert float(optimizer.last_step.fraction_above_gamma) == 0.0
        assert_same_tensors(model.parameters(), plain.parameters(), f"step {step} parameters")
        assert_same_tensors(model.buffers(), plain.buffers(), f"step {step} buffers")


@pytest.mark.parametrize("net", ["mlp", "preact_batchnorm"])
def test_tiny_gamma_direction_has_norm_at_most_one(net: str) -> None:
    """gamma -> 0: every example contributes a unit vector, so ||d|| <= 1 (lr 1, no momentum/wd: the
    parameter change is -d)."""
    from engm_opacus import make_engm

    build = {"mlp": nets.mlp, "preact_batchnorm": nets.preact_batchnorm}[net]
    model = build()
    model, optimizer = make_engm(model, torch.optim.SGD(model.parameters(), lr=1.0), gamma=1e-8)
    x, y, start = image_batches(6, steps=1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    batch = pgd_autograd_eval(model, x, y, start)
    ce_loss(model, *batch).backward()
    optimizer.step()
    change = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    stats = optimizer.last_step
    assert float(change) <= 1.0 + 1e-12
    assert float(stats.fraction_above_gamma) == 1.0
    torch.testing.assert_close(torch.as_tensor(stats.weights).double(), 1.0 / torch.as_tensor(stats.per_example_norms).double(), **TOL)
    assert float(stats.direction_norm) == pytest.approx(float(change), rel=1e-10)
