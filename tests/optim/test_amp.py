"""Mixed precision: a GradScaler overflow skips the ENGM step (parameters and momentum untouched); fp16 autocast runs."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from engm_opacus import make_engm
from tests.helpers.nets import images, preact_batchnorm


def test_grad_scaler_overflow_skips_the_step_and_keeps_momentum() -> None:
    model = preact_batchnorm().float()
    x, y = images(4, torch.Generator().manual_seed(0), dtype=torch.float32)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    wrapped, optimizer = make_engm(model, sgd, gamma=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)  # the scaled loss overflows float32: inf gradients
    before = copy.deepcopy(model.state_dict())
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(wrapped(x), y)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()
    assert optimizer.last_step.skipped
    assert scaler.get_scale() < 2.0**100, "the scaler saw the overflow and backed off"
    for name, value in model.named_parameters():
        assert torch.equal(value.detach(), before[name]), name
    assert not sgd.state, "a skipped step must not create momentum buffers"
    # the next step with a sane scale trains
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(wrapped(x), y)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert not optimizer.last_step.skipped and sgd.state
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fp16_and_bf16_autocast_run_for_both_variants() -> None:
    for variant in ("exact", "input-norm"):
        for dtype in (torch.float16, torch.bfloat16):
            model = preact_batchnorm().float()
            x, y = images(4, torch.Generator().manual_seed(1), dtype=torch.float32)
            wrapped, optimizer = make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=1.0, variant=variant)
            for _ in range(2):
                with torch.autocast("cpu", dtype=dtype):
                    loss = F.cross_entropy(wrapped(x), y)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            assert torch.isfinite(optimizer.last_step.per_example_norms).all(), (variant, dtype)


def fast_path_step(model: torch.nn.Module, scaler, x: torch.Tensor, y: torch.Tensor, dtype=None):
    wrapped, optimizer = make_engm(
        model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), gamma=1.0, variant="input-norm",
        input_grad_source="attack", input_norm_scale=0.5,
    )
    x_adv = x.clone().requires_grad_(True)
    torch.autograd.grad(F.cross_entropy(wrapped(x_adv), y), x_adv)  # the attack's last input gradient
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = F.cross_entropy(wrapped(x), y)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return optimizer


def test_input_norm_fast_path_with_a_grad_scaler() -> None:
    """The weights are fixed before the scaled backward; the step divides p.grad by the scale (a power of two: exact),
    and an overflow skips the step."""
    x, y = images(4, torch.Generator().manual_seed(2), dtype=torch.float32)
    plain, scaled, overflowing = (preact_batchnorm().float() for _ in range(3))
    scaled.load_state_dict(plain.state_dict())
    overflowing.load_state_dict(plain.state_dict())
    before = copy.deepcopy(plain.state_dict())
    fast_path_step(plain, None, x, y)
    optimizer = fast_path_step(scaled, torch.amp.GradScaler("cpu", init_scale=2.0**8), x, y)
    assert not optimizer.last_step.skipped
    for p, q in zip(plain.parameters(), scaled.parameters()):
        assert torch.equal(p, q)
    optimizer = fast_path_step(overflowing, torch.amp.GradScaler("cpu", init_scale=2.0**100), x, y, torch.float16)
    assert optimizer.last_step.skipped
    for name, value in overflowing.named_parameters():
        assert torch.equal(value.detach(), before[name]), name
