"""train_step with mixed precision: a GradScaler overflow skips the step (parameters and momentum unchanged); autocast runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engm_opacus import make_engm
from engm_opacus.at.losses import ATLossOutput, get_at_loss
from engm_opacus.at.step import train_step
from tests.helpers.nets import groupnorm_cnn, images


class ScaledCE:
    """Cross-entropy on clean inputs times ``factor`` (``1e30`` makes the fp16 backward overflow)."""

    name = "scaled-ce"

    def __init__(self) -> None:
        self.factor = 1.0

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> ATLossOutput:
        logits = model(x)
        return ATLossOutput(loss=F.cross_entropy(logits, y) * self.factor, x_adv=x, logits_adv=logits.detach())


def optimizer_for(kind: str, model: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.SGD]:
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    if kind == "msgd":
        return model, sgd, sgd
    wrapped, optimizer = make_engm(model, sgd, gamma=1.0, variant=kind)
    return wrapped, optimizer, sgd


@pytest.mark.parametrize("kind", ["msgd", "exact", "input-norm"])
def test_an_inf_gradient_step_is_skipped_with_parameters_and_momentum_unchanged(kind: str) -> None:
    model = groupnorm_cnn().float()
    trained, optimizer, sgd = optimizer_for(kind, model)
    x, y = images(6, torch.Generator().manual_seed(0), dtype=torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    loss = ScaledCE()
    first = train_step(trained, optimizer, loss, x, y, autocast_dtype=torch.float16, scaler=scaler)
    assert not first.skipped and sgd.state, "a normal step trains and creates momentum"
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    momentum = {name: sgd.state[p]["momentum_buffer"].clone() for name, p in model.named_parameters()}
    loss.factor = 1e30
    metrics = train_step(trained, optimizer, loss, x, y, autocast_dtype=torch.float16, scaler=scaler)
    assert metrics.skipped and scaler.get_scale() == 2.0**9
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), params[name]), name
        assert torch.equal(sgd.state[p]["momentum_buffer"], momentum[name]), name
        assert p.grad is None, "zero_grad ran after the skipped step"
    if kind != "msgd":
        assert optimizer.last_step.skipped
    loss.factor = 1.0
    assert not train_step(trained, optimizer, loss, x, y, autocast_dtype=torch.float16, scaler=scaler).skipped


@pytest.mark.parametrize("kind", ["msgd", "exact", "input-norm"])
def test_bf16_autocast_runs_the_attack_and_the_loss(kind: str) -> None:
    model = groupnorm_cnn().float()
    trained, optimizer, _ = optimizer_for(kind, model)
    x, y = images(6, torch.Generator().manual_seed(1), dtype=torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    seen: list = []
    handle = model.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    metrics = train_step(trained, optimizer, get_at_loss("trades", steps=1), x, y, autocast_dtype=torch.bfloat16)
    handle.remove()
    assert seen and set(seen) == {torch.bfloat16}, "every forward (attack and loss) ran under autocast"
    assert torch.isfinite(torch.tensor(metrics.loss)) and not metrics.skipped
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters())), "the step trained"
    assert all(p.dtype == torch.float32 for p in model.parameters())
