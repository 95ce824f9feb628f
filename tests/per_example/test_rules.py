"""Each per-layer rule against per-example autograd on the plain layer, float64, one call and two calls."""

from __future__ import annotations

from typing import Callable, List

import pytest
import torch
from torch import nn

from engm_opacus.per_example.rules import conv as conv_rules
from engm_opacus.per_example.rules import linear as linear_rules
from engm_opacus.per_example.rules import outer, rule_for
from engm_opacus.per_example.rules.base import PerExampleGrads
from engm_opacus.wrap import make_engm

B = 4


def per_example_grads(layer: nn.Module, inputs: List[torch.Tensor], upstream: List[torch.Tensor]) -> List[torch.Tensor]:
    """``[B, *p.shape]`` gradients of ``sum_c <upstream_c[i], layer(inputs_c)[i]>`` w.r.t. example ``i``'s own
    parameter copy, by one forward per example and copy (the layer normalizes per example here)."""
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = []
    for i in range(B):
        total = sum((layer(x[i : i + 1]) * u[i : i + 1]).sum() for x, u in zip(inputs, upstream))
        grads.append(torch.autograd.grad(total, params))
    return [torch.stack([g[k] for g in grads]) for k in range(len(params))]


def recorded_norms_and_weighted(layer: nn.Module, inputs: List[torch.Tensor], upstream: List[torch.Tensor], factors: torch.Tensor):
    """The library's squared norms and weighted gradients for the same calls (records of one backward)."""
    model, optimizer = make_engm(layer, torch.optim.SGD(layer.parameters(), lr=0.0), gamma=1.0, loss_reduction="sum")
    total = sum((model(x) * u).sum() for x, u in zip(inputs, upstream))
    total.backward()
    (record,), _ = model.take_records()
    if layer in record.calls:
        reduction = rule_for(layer).reduction(layer, record.calls[layer])
    else:  # layers with small per-example gradients are reduced as their backward runs
        reduction = PerExampleGrads(record.per_example[layer])
    squared = reduction.squared_norms()
    weighted = reduction.weighted_grads(factors)
    params = [p for p in layer.parameters() if p.requires_grad]
    return [squared[p] for p in params], [weighted[p] for p in params]


LAYERS: List[Callable[[], nn.Module]] = [
    lambda: nn.Linear(5, 3),
    lambda: nn.Conv1d(2, 3, 3, padding=1, padding_mode="circular"),
    lambda: nn.Conv2d(2, 4, 3, stride=2, padding=1),
    lambda: nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2, padding_mode="reflect"),
    lambda: nn.Conv2d(2, 3, 2, padding="same", padding_mode="replicate", bias=False),
    lambda: nn.Conv3d(2, 2, 2, padding=1),
    lambda: nn.GroupNorm(2, 4),
    lambda: nn.LayerNorm(5),
    lambda: nn.Embedding(7, 3),
]


def input_for(layer: nn.Module, generator: torch.Generator) -> torch.Tensor:
    if isinstance(layer, nn.Embedding):
        return torch.randint(0, 7, (B, 6), generator=generator)
    if isinstance(layer, (nn.Linear, nn.LayerNorm)):
        return torch.randn(B, 6, 5, generator=generator, dtype=torch.float64)
    channels = layer.in_channels if isinstance(layer, nn.modules.conv._ConvNd) else layer.num_channels
    spatial = {nn.Conv1d: (7,), nn.Conv3d: (3, 4, 3)}.get(type(layer), (6, 5))
    return torch.randn(B, channels, *spatial, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("calls", [1, 2])
@pytest.mark.parametrize("path", ["ghost", "instantiate"])
@pytest.mark.parametrize("make_layer", LAYERS)
def test_rule_equals_per_example_autograd(make_layer, path: str, calls: int, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    layer = make_layer().double()
    # force each norm path of the outer-product layers (Linear, Conv): ghost always / never
    for rules in (conv_rules, linear_rules):
        monkeypatch.setattr(rules, "prefer_ghost", lambda *shape: path == "ghost")
    if path == "ghost":
        monkeypatch.setattr(outer, "CHUNK_ELEMENTS", 1)  # one example per chunk: the chunk loop is exercised
    inputs = [input_for(layer, generator) for _ in range(calls)]
    upstream = [torch.randn(layer(x).shape, generator=generator, dtype=torch.float64) for x in inputs]
    expected = per_example_grads(layer, inputs, upstream)
    factors = torch.rand(B, generator=generator, dtype=torch.float64)
    squared, weighted = recorded_norms_and_weighted(layer, inputs, upstream, factors)
    for got_sq, got_w, grads in zip(squared, weighted, expected):
        torch.testing.assert_close(got_sq, grads.reshape(B, -1).square().sum(1), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got_w, torch.einsum("i,i...->...", factors, grads), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls,shape", [(nn.BatchNorm1d, (B, 3)), (nn.BatchNorm1d, (B, 3, 5)), (nn.BatchNorm2d, (B, 3, 4, 4)), (nn.BatchNorm3d, (B, 3, 2, 3, 2))])
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_rule_equals_per_copy_autograd(cls: type, shape: tuple, training: bool) -> None:
    """``dL/dtheta^(i)`` with example i's own copy of weight/bias in the true batch computation."""
    torch.manual_seed(0)
    layer = cls(3).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
        layer.running_mean.uniform_(-0.2, 0.2)
        layer.running_var.uniform_(0.5, 2.0)
    layer.train(training)
    x = torch.randn(shape, dtype=torch.float64)
    upstream = torch.randn(shape, dtype=torch.float64)
    reference = cls(3, momentum=0.0).double().train(training)
    reference.load_state_dict(layer.state_dict())
    weight = reference.weight.detach().expand(B, 3).clone().requires_grad_()
    bias = reference.bias.detach().expand(B, 3).clone().requires_grad_()
    rows = []
    for j in range(B):
        out = torch.func.functional_call(reference, {"weight": weight[j], "bias": bias[j]}, (x,))
        rows.append(out[j])
    (torch.stack(rows) * upstream).sum().backward()
    factors = torch.rand(B, dtype=torch.float64)
    squared, weighted = recorded_norms_and_weighted(layer, [x], [upstream], factors)
    for got_sq, got_w, grads in zip(squared, weighted, [weight.grad, bias.grad]):
        torch.testing.assert_close(got_sq, grads.square().sum(1), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got_w, factors @ grads, rtol=1e-10, atol=1e-12)
