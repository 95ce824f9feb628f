"""BatchNorm under ENGM: held-statistics per-example gradients, real-BN weighted update, vs an independent loop.

Definition (engm_opacus.batchnorm): ``g_i`` is the gradient of ``l_i`` with every
BatchNorm call's batch mean/variance held constant; ``d`` is the gradient of
``(1/B) sum_i w_i l_i`` through ordinary training-mode BatchNorm. The reference below
implements it with plain ``nn.BatchNorm`` layers, forward hooks and ``torch.autograd.grad``.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Tuple

import pytest
import torch
from naive import naive_norms
from test_ghost import AT_LOSSES, PairLoss, stacked
from torch import nn
from torch.nn import functional as F

from engm_opacus import make_engm
from engm_opacus.batchnorm import ENGMBatchNorm1d, ENGMBatchNorm2d, batch_stats_held_constant, convert_batchnorm
from engm_opacus.ghost import TwoPassENGMOptimizer
from engm_opacus.models import preact_resnet18

BATCH = 4
STEPS = 2


pytestmark = pytest.mark.usefixtures("one_thread")

Loss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    return preact_resnet18(num_classes=5, in_channels=1, norm="batch", width=2).double()


def bn_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 5)).double()


MODELS: Dict[str, Tuple[Callable[[], nn.Module], Tuple[int, ...]]] = {
    "preact-resnet18": (tiny_resnet, (1, 8, 8)),
    "mlp-batchnorm1d": (bn_mlp, (1, 4, 4)),
}


def batches(shape: Tuple[int, ...], seed: int = 1) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``(X = stack([x, x_adv], 1), y)`` batches, as in test_ghost."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        x = torch.rand((BATCH, *shape), generator=generator, dtype=torch.float64)
        delta = (torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1) * (8 / 255)
        out.append((torch.stack([x, (x + delta).clamp(0, 1)], dim=1), torch.randint(0, 5, (BATCH,), generator=generator)))
    return out


class HeldStats:
    """Records each BatchNorm call's batch statistics during a batch forward; replays them for single examples."""

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.stats: Dict[nn.Module, List[Tuple[torch.Tensor, torch.Tensor]]] = {layer: [] for layer in self.layers}

    @contextmanager
    def record(self) -> Iterator[None]:
        def hook(module: nn.Module, inputs: Tuple[torch.Tensor]) -> None:
            x = inputs[0].detach()
            dims = [0] + list(range(2, x.dim()))
            self.stats[module].append((x.mean(dims), x.var(dims, unbiased=False)))

        handles = [layer.register_forward_pre_hook(hook) for layer in self.layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Each BatchNorm call's output becomes the affine map with the recorded (constant) statistics."""
        calls = {layer: 0 for layer in self.layers}

        def hook(module: nn.Module, inputs: Tuple[torch.Tensor], _: torch.Tensor) -> torch.Tensor:
            mean, var = self.stats[module][calls[module]]
            calls[module] += 1
            return F.batch_norm(inputs[0], mean, var, module.weight, module.bias, False, 0.0, module.eps)

        handles = [layer.register_forward_hook(hook) for layer in self.layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def naive_bn_engm_step(model: nn.Module, sgd: torch.optim.Optimizer, X: torch.Tensor, y: torch.Tensor, gamma: float, loss: Loss) -> torch.Tensor:
    """One ENGM step by the definition, with plain BatchNorm; returns the norms ``n_i``."""
    params = [p for p in model.parameters() if p.requires_grad]
    held = HeldStats(model)
    with held.record():
        losses = loss(model, X, y)  # training mode: real BatchNorm, running statistics updated once
    model.eval()  # single-example forwards below must not touch the running statistics
    per_example = []
    for i in range(len(X)):
        with held.replay():
            per_example.append(torch.autograd.grad(loss(model, X[i : i + 1], y[i : i + 1]).sum(), params))
    model.train()
    norms = naive_norms(per_example)
    weights = torch.tensor([1.0 / max(float(n), gamma) for n in norms], dtype=losses.dtype)
    for p, d in zip(params, torch.autograd.grad((weights * losses).sum() / len(X), params)):
        p.grad = d
    sgd.step()
    sgd.zero_grad()
    return norms


def sgd(model: nn.Module, lr: float = 0.3, momentum: float = 0.9, weight_decay: float = 5e-4) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def assert_same_state(model: nn.Module, reference: nn.Module) -> None:
    for (name, p), p_ref in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(p, p_ref, rtol=0, atol=1e-10, msg=name)


CASES = [("preact-resnet18", loss) for loss in sorted(AT_LOSSES)] + [("mlp-batchnorm1d", "trades")]


@pytest.mark.parametrize("model_name, loss_name", CASES)
def test_hooks_and_ghost_equal_the_held_stats_definition(model_name: str, loss_name: str) -> None:
    build, shape = MODELS[model_name]
    loss = AT_LOSSES[loss_name]
    data = batches(shape)
    reference = build()
    probe = copy.deepcopy(reference)
    gamma = float(naive_bn_engm_step(probe, sgd(probe), *data[0], 1.0, stacked(loss)).median())
    models = {mode: copy.deepcopy(reference) for mode in ("hooks", "ghost")}
    optimizers = {}
    for mode, model in models.items():
        wrapped, optimizer = make_engm(model, sgd(model), gamma=gamma, grad_sample_mode=mode)
        assert isinstance(optimizer, TwoPassENGMOptimizer)
        for X, y in data:
            optimizer.backward(loss(wrapped, X[:, 0], X[:, 1], y))
            optimizer.step()
            optimizer.zero_grad()
        optimizers[mode] = optimizer
    reference_sgd = sgd(reference)
    for X, y in data:
        norms = naive_bn_engm_step(reference, reference_sgd, X, y, gamma, stacked(loss))
    assert 0.0 < optimizers["ghost"].last_step.fraction_above_gamma < 1.0
    for mode, model in models.items():
        assert_same_state(model, reference)  # parameters and running statistics
        torch.testing.assert_close(optimizers[mode].last_step.per_example_norms, norms, rtol=0, atol=1e-10)
        assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())


def test_gamma_above_all_norms_is_msgd_with_lr_over_gamma() -> None:
    """The weighted pass runs through real BatchNorm: no normalization active means exactly MSGD (lr/gamma)."""
    data = batches(MODELS["preact-resnet18"][1])
    loss = stacked(AT_LOSSES["trades"])
    reference = tiny_resnet()
    probe = copy.deepcopy(reference)
    gamma = 10.0 * float(naive_bn_engm_step(probe, sgd(probe), *data[0], 1.0, loss).max())
    model = copy.deepcopy(reference)
    wrapped, optimizer = make_engm(model, sgd(model, lr=0.3, weight_decay=0.0), gamma=gamma, grad_sample_mode="ghost")
    msgd = sgd(reference, lr=0.3 / gamma, weight_decay=0.0)
    for X, y in data:
        optimizer.backward(loss(wrapped, X, y))
        optimizer.step()
        optimizer.zero_grad()
        loss(reference, X, y).mean().backward()
        msgd.step()
        msgd.zero_grad()
    assert optimizer.last_step.fraction_above_gamma == 0.0
    assert_same_state(model, reference)


BN_CONFIGS = [
    (nn.BatchNorm1d, (5, 3), {}),
    (nn.BatchNorm1d, (5, 3, 4), {"momentum": None}),
    (nn.BatchNorm2d, (5, 3, 4, 4), {}),
    (nn.BatchNorm2d, (5, 3, 4, 4), {"affine": False}),
    (nn.BatchNorm2d, (5, 3, 4, 4), {"track_running_stats": False}),
    (nn.BatchNorm3d, (5, 3, 2, 2, 2), {"momentum": 0.3}),
]


@pytest.mark.parametrize("cls, shape, kwargs", BN_CONFIGS)
def test_converted_batchnorm_has_plain_batchnorm_numerics(cls: type, shape: Tuple[int, ...], kwargs: dict) -> None:
    torch.manual_seed(0)
    plain = cls(3, **kwargs).double()
    if plain.affine:
        nn.init.uniform_(plain.weight, 0.5, 1.5)
        nn.init.uniform_(plain.bias, -0.5, 0.5)
    converted = copy.deepcopy(plain)
    assert convert_batchnorm(converted) == 1 and isinstance(converted, cls)
    for step in range(2):
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        target = torch.randn(shape, dtype=torch.float64)
        outputs = [(m(x) * target).sum() for m in (plain, converted)]
        grads = [torch.autograd.grad(out, [x, *m.parameters()]) for out, m in zip(outputs, (plain, converted))]
        for g_plain, g_converted in zip(*grads):
            torch.testing.assert_close(g_converted, g_plain, rtol=0, atol=1e-12)
        assert_same_state(converted, plain)
    plain.eval(), converted.eval()
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(converted(x), plain(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls, shape", [(nn.BatchNorm1d, (6, 3)), (nn.BatchNorm2d, (6, 3, 4, 4))])
def test_held_stats_backward_is_the_gradient_with_detached_statistics(cls: type, shape: Tuple[int, ...]) -> None:
    torch.manual_seed(0)
    layer = cls(3).double()
    nn.init.uniform_(layer.weight, 0.5, 1.5)
    converted = copy.deepcopy(layer)
    convert_batchnorm(converted)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    target = torch.randn(shape, dtype=torch.float64)
    with batch_stats_held_constant(converted):
        held = torch.autograd.grad((converted(x) * target).sum(), [x, converted.weight, converted.bias])
    dims = [0] + list(range(2, x.dim()))
    mean, var = x.mean(dims).detach(), x.var(dims, unbiased=False).detach()
    out = F.batch_norm(x, mean, var, layer.weight, layer.bias, False, 0.0, layer.eps)
    expected = torch.autograd.grad((out * target).sum(), [x, layer.weight, layer.bias])
    for g, e in zip(held, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12)
    assert not converted.hold_batch_stats


def test_make_engm_converts_in_place_and_keeps_the_optimizer_valid() -> None:
    model = bn_mlp()
    optimizer = sgd(model)
    params = list(model.parameters())
    make_engm(model, optimizer, gamma=1.0)
    assert type(model[2]) is ENGMBatchNorm1d
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert type(tiny_resnet().bn) is nn.BatchNorm2d and convert_batchnorm(tiny_resnet()) == 17


def test_functorch_mode_refuses_batchnorm_naming_the_fix() -> None:
    model = bn_mlp()
    with pytest.raises(ValueError, match=r"functorch.*BatchNorm.*Fix: use grad_sample_mode='hooks' or 'ghost'"):
        make_engm(model, sgd(model), gamma=1.0, grad_sample_mode="functorch")
    assert type(model[2]) is nn.BatchNorm1d  # refused before converting


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_other_layers_with_buffers_are_still_refused_by_name(mode: str) -> None:
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.InstanceNorm2d(3, affine=True, track_running_stats=True), nn.Flatten())
    with pytest.raises(ValueError) as error:
        make_engm(model, sgd(model), gamma=1.0, grad_sample_mode=mode)
    message = str(error.value)
    assert "InstanceNorm2d" in message and "Fix:" in message and "BatchNorm" not in message.split("Fix:")[0]


def test_sync_batchnorm_is_refused_by_name() -> None:
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.SyncBatchNorm(3), nn.Flatten())
    with pytest.raises(ValueError, match=r"(?s)SyncBatchNorm.*Fix:"):
        make_engm(model, sgd(model), gamma=1.0, grad_sample_mode="ghost")
    assert isinstance(model[1], nn.SyncBatchNorm) and type(model[1]) is not ENGMBatchNorm2d
