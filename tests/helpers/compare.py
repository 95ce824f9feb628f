"""Run a script with ``make_engm`` and the naive reference side by side and assert they agree.

The library side only uses the public contract: ``make_engm``, ``optimizer.step()/zero_grad()``,
``optimizer.last_step`` and the wrapped model's ``parameters()``/``buffers()``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import pytest
import torch
from torch import nn

from tests.helpers.nets import images
from tests.helpers.naive import gamma_between
from tests.helpers.steps import EPS, LossFn, Prepare, Probe, Reference, library_step, naive_step

TOL = {"atol": 1e-10, "rtol": 1e-10}
SGD_HYPER = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-3}
STEPS = 3


def engm_sgd(model: nn.Module, hyper: dict[str, Any], gamma: float, **engm_kwargs: Any) -> tuple[nn.Module, Any]:
    """``make_engm(model, torch.optim.SGD(model.parameters(), **hyper), gamma=gamma, **engm_kwargs)``."""
    from engm_opacus import make_engm

    return make_engm(model, torch.optim.SGD(model.parameters(), **hyper), gamma=gamma, **engm_kwargs)


def sgd_hyper(nesterov: bool, **overrides: Any) -> dict[str, Any]:
    """Momentum 0.9, weight decay 5e-3, lr 0.1, ``nesterov`` (and any override)."""
    return {**SGD_HYPER, "nesterov": nesterov, **overrides}


def image_batches(batch: int, seed: int = 0, steps: int = STEPS, dtype: torch.dtype = torch.float64) -> list[tuple[torch.Tensor, ...]]:
    """``steps`` tuples ``(x, y, start)``: images, labels and a random start in the eps-ball."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x, y = images(batch, generator, dtype)
        start = (torch.rand(x.shape, generator=generator, dtype=dtype) * 2 - 1) * EPS
        out.append((x, y, start))
    return out


def assert_same_tensors(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor], what: str, **tol: float) -> None:
    """Pairwise ``assert_close`` of two equally long tensor lists (default tolerance 1e-10)."""
    actual, expected = list(actual), list(expected)
    assert len(actual) == len(expected), f"{what}: {len(actual)} tensors vs {len(expected)}"
    for k, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a.detach(), e.detach(), msg=lambda m: f"{what}[{k}]: {m}", **(tol or TOL))


def assert_stats(stats: Any, norms: torch.Tensor, weights: torch.Tensor, gamma: float, step: int) -> None:
    """``optimizer.last_step`` against the naive norms and weights."""
    assert not stats.skipped, f"step {step}: optimizer reports a skipped step"
    torch.testing.assert_close(
        torch.as_tensor(stats.per_example_norms).double(), norms, **TOL, msg=lambda m: f"step {step} per_example_norms: {m}"
    )
    torch.testing.assert_close(torch.as_tensor(stats.weights).double(), weights, **TOL, msg=lambda m: f"step {step} weights: {m}")
    expected_fraction = float((norms > gamma).double().mean())
    assert float(stats.fraction_above_gamma) == pytest.approx(expected_fraction, abs=1e-12), f"step {step}"


def pick_gamma(
    build: Callable[[], nn.Module],
    data: Sequence[torch.Tensor],
    prepare: Prepare,
    loss_fn: LossFn,
    reference: Reference,
    optimizer_params: Callable[[nn.Module], Any] = lambda model: model.parameters(),
) -> float:
    """Gamma between the naive first-step norms (over the parameters the optimizer holds), asserted
    to normalize some examples and not others."""
    model = build()
    sgd = torch.optim.SGD(optimizer_params(model), lr=0.0)
    norms, _ = naive_step(model, sgd, data, prepare, loss_fn, 1.0, reference)
    gamma = gamma_between(norms)
    assert (norms > gamma).any() and (norms < gamma).any(), f"gamma {gamma} not between norms {norms.tolist()}"
    return gamma


def run_and_compare(
    build: Callable[[], nn.Module],
    batches: Sequence[Sequence[torch.Tensor]],
    prepare: Prepare,
    loss_fn: LossFn,
    reference: Reference,
    *,
    hyper: dict[str, Any],
    gamma: float | None = None,
    probe: Probe | None = None,
    probe_on_reference: bool = False,
    call_plain_module: bool = False,
    pre_forward: Callable[[nn.Module, torch.optim.Optimizer, tuple[torch.Tensor, ...]], None] | None = None,
    zero_grad_after_forward: bool = False,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    engm_kwargs: dict[str, Any] | None = None,
    optimizer_params: Callable[[nn.Module], Any] = lambda model: model.parameters(),
) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module, float]:
    """Train ``build()`` with ``make_engm`` and a second ``build()`` with the naive reference; compare.

    After every step: parameters and buffers (BatchNorm running statistics) at 1e-10, and
    ``optimizer.last_step`` norms/weights against the naive ones. ``probe`` runs between the
    training forward and backward (also on the reference when ``probe_on_reference``, for probes
    that move BatchNorm statistics); ``call_plain_module`` makes the script call the model object
    that was passed to ``make_engm`` instead of the returned one; ``optimizer_params(model)`` is what
    both SGD optimizers get (parameter groups, a subset). Returns
    ``(engm_model, engm_optimizer, reference_model, gamma)``.
    """
    from engm_opacus import make_engm

    if gamma is None:
        gamma = pick_gamma(build, batches[0], prepare, loss_fn, reference, optimizer_params)
    reference_model = build()
    sgd = torch.optim.SGD(optimizer_params(reference_model), **hyper)
    plain = build()
    optimizer = torch.optim.SGD(optimizer_params(plain), **hyper)
    model, optimizer = make_engm(plain, optimizer, gamma=gamma, **(engm_kwargs or {}))
    scripted = plain if call_plain_module else model
    schedulers = [scheduler(optimizer), scheduler(sgd)] if scheduler is not None else []
    for step, data in enumerate(batches):
        library_step(
            scripted, optimizer, data, prepare, loss_fn,
            pre_forward=pre_forward, probe=probe, zero_grad_after_forward=zero_grad_after_forward,
        )
        norms, weights = naive_step(
            reference_model, sgd, data, prepare, loss_fn, gamma, reference,
            after_forward=probe if probe_on_reference else None,
        )
        assert_stats(optimizer.last_step, norms, weights, gamma, step)
        assert_same_tensors(model.parameters(), reference_model.parameters(), f"step {step} parameters")
        assert_same_tensors(model.buffers(), reference_model.buffers(), f"step {step} buffers")
        for s in schedulers:
            s.step()
    return model, optimizer, reference_model, gamma
