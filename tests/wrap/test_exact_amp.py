"""``torch.amp`` under ``make_engm``: GradScaler (exact, float64) and bf16 autocast (against fp32).

GradScaler: ``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()`` must give the
norms and the step of the unscaled loss (the scale is a power of two, so float64 at 1e-10).
Autocast: bf16 on CPU with a float32 model, compared with the fp32 step at a tolerance measured
from plain MSGD's own bf16 deviation (see the test's docstring).
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from tests.helpers import nets
from tests.helpers.compare import assert_same_tensors, assert_stats, engm_sgd, image_batches, pick_gamma, sgd_hyper
from tests.helpers.naive import per_example_grads_copies, per_example_grads_loop
from tests.helpers.steps import ce_loss, naive_step, no_attack, pgd_autograd_eval


@pytest.mark.parametrize("net", ["mlp", "preact_batchnorm"])
def test_grad_scaler_step_equals_unscaled_naive_step(net: str) -> None:
    """``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()``: the norms and the step
    are those of the unscaled loss (float64; the scale is a power of two)."""
    build, reference_fn = {"mlp": (nets.mlp, per_example_grads_loop), "preact_batchnorm": (nets.preact_batchnorm, per_example_grads_copies)}[net]
    batches = image_batches(4)
    hyper = sgd_hyper(True)
    gamma = pick_gamma(build, batches[0], pgd_autograd_eval, ce_loss, reference_fn)
    model, optimizer = engm_sgd(build(), hyper, gamma)
    scaler = torch.amp.GradScaler("cpu")
    reference = build()
    sgd = torch.optim.SGD(reference.parameters(), **hyper)
    for step, data in enumerate(batches):
        batch = pgd_autograd_eval(model, *data)
        assert scaler.get_scale() > 1.0
        scaler.scale(ce_loss(model, *batch)).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        norms, weights = naive_step(reference, sgd, data, pgd_autograd_eval, ce_loss, gamma, reference_fn)
        assert_stats(optimizer.last_step, norms, weights, gamma, step)
        assert_same_tensors(model.parameters(), reference.parameters(), f"step {step} parameters")
        assert_same_tensors(model.buffers(), reference.buffers(), f"step {step} buffers")


# ---------------------------------------------------------------- autocast
def _autocast_run(build, batches, gamma, hyper, *, engm: bool, autocast: bool, scaled: bool):
    """3 steps (float32 model); returns (total parameter change, per-example norms or None)."""
    model = build()
    optimizer = torch.optim.SGD(model.parameters(), **hyper)
    if engm:
        model, optimizer = engm_sgd(model, hyper, gamma)
    scaler = torch.amp.GradScaler("cpu") if scaled else None
    start = [p.detach().clone() for p in model.parameters()]
    norms = []
    for x, y, _ in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x), y)
        assert loss.dtype == torch.float32  # cross_entropy runs in fp32 under autocast
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad()
        if engm:
            norms.append(torch.as_tensor(optimizer.last_step.per_example_norms).float())
    for p in model.parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p).all()
    change = torch.cat([(p.detach() - s).flatten() for p, s in zip(model.parameters(), start)])
    return change, (torch.cat(norms) if engm else None)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("scaled", [False, True], ids=["autocast", "autocast+gradscaler"])
@pytest.mark.parametrize("net", ["mlp", "preact_batchnorm"])
def test_autocast_bf16_step_is_as_close_to_fp32_as_plain_msgd_is(net: str, scaled: bool) -> None:
    """Tolerance: bf16 keeps 8 significant bits (unit roundoff 2**-9 ~ 2e-3), and how much that
    moves a gradient depends on the net: ~0.5% for the MLP, ~8% for the tiny BatchNorm net
    (normalizing channels of 6x3x3 values amplifies the rounding of the conv outputs). So the
    noise floor is measured, not assumed: ``noise`` = relative change of 3 plain-MSGD steps under
    autocast vs fp32 (same model, data, hyperparameters; no ENGM). ENGM's direction is
    (1/N) sum w_i g_i with w_i = 1/max(n_i, gamma) Lipschitz in n_i, so its relative error is at
    most that of the g_i plus that of the n_i: we allow ``2 * noise + 1e-2`` for the update and
    for every per-example norm, and an absolute ceiling of 0.25. A real mistake (a dropped or
    doubled example or layer, a wrong scale or dtype path, unscaled GradScaler records) changes the
    update by O(1)."""
    build = {"mlp": lambda: nets.mlp().float(), "preact_batchnorm": lambda: nets.preact_batchnorm().float()}[net]
    batches = image_batches(6, dtype=torch.float32)
    hyper = sgd_hyper(True)
    gamma = pick_gamma(build, batches[0], no_attack, ce_loss, per_example_grads_loop if net == "mlp" else per_example_grads_copies)
    msgd32, _ = _autocast_run(build, batches, gamma, hyper, engm=False, autocast=False, scaled=False)
    msgd16, _ = _autocast_run(build, batches, gamma, hyper, engm=False, autocast=True, scaled=scaled)
    noise = _relative(msgd16, msgd32)
    tolerance = min(2 * noise + 1e-2, 0.25)
    engm32, norms32 = _autocast_run(build, batches, gamma, hyper, engm=True, autocast=False, scaled=False)
    engm16, norms16 = _autocast_run(build, batches, gamma, hyper, engm=True, autocast=True, scaled=scaled)
    assert _relative(engm16, engm32) <= tolerance, (noise, _relative(engm16, engm32))
    assert float(((norms16 - norms32) / norms32).abs().max()) <= tolerance, (noise, norms16, norms32)
