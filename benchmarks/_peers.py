"""The rows of benchmarks/step_cost.py: one PGD-10 adversarial-training step per method, built on one model.

Every row is split into ``attack()`` (PGD-10: L-inf, eps 8/255, step 2/255, random start,
``torch.autograd.grad`` w.r.t. the input with the model in train mode, as Madry et al. and
Rice et al. do) and ``outer(x_adv)`` (one training forward, the method's backward pass(es),
``optimizer.step()``, ``optimizer.zero_grad()``). The update of every ENGM-like row is, for
per-example gradients ``g_i`` of the mean cross-entropy, ``n_i = ||g_i||``,
``w_i = 1/max(n_i, gamma)``, ``d = (1/B) sum_i w_i g_i``, then ``torch.optim.SGD`` on ``d``
(Opacus ghost clipping computes ``gamma * d``: the same cost).

A row that cannot run on a model raises :class:`NotApplicable` with the reason, which the
table prints in its note column.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

GAMMA = 1.0
EPS, ALPHA, ATTACK_STEPS = 8 / 255, 2 / 255, 10
NUM_CLASSES = 10
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4
NORMS: Dict[str, str] = {"bn": "batch", "gn": "group"}
"""Model name suffix -> normalization layer of PreAct ResNet-18."""


class NotApplicable(Exception):
    """A method that cannot run on a model; ``str(self)`` is the reason shown in the table."""


@dataclass
class Row:
    """One method on one model: its PGD-10 attack, its outer step and a note for the table."""

    attack: Callable[[], Tensor]
    outer: Callable[[Tensor], None]
    note: str = ""


# --- the network: PreAct ResNet-18 as in Rice et al. (2020), preactresnet.py -------------------


def norm_layer(norm: str, channels: int) -> nn.Module:
    """``BatchNorm2d(C)`` or ``GroupNorm(gcd(32, C), C)``."""
    return nn.BatchNorm2d(channels) if norm == "batch" else nn.GroupNorm(math.gcd(32, channels), channels)


class PreActBlock(nn.Module):
    """Pre-activation basic block; ``out += shortcut`` in place (the reference code) unless ``inplace=False``."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str, inplace: bool):
        super().__init__()
        self.bn1, self.bn2 = norm_layer(norm, in_planes), norm_layer(norm, planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False) if stride != 1 or in_planes != planes else None
        self.inplace = inplace

    def forward(self, x: Tensor) -> Tensor:
        """``conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut`` (shortcut after the first activation)."""
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        if self.inplace:
            out += shortcut
            return out
        return out + shortcut


class PreActResNet18(nn.Module):
    """Stem conv, 4 stages x 2 blocks (``width * (1, 2, 4, 8)`` channels), norm, ReLU, global pool, linear."""

    def __init__(self, norm: str, width: int, inplace: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        blocks, in_planes = [], width
        for multiplier, stride in zip((1, 2, 4, 8), (1, 2, 2, 2)):
            for block_stride in (stride, 1):
                blocks.append(PreActBlock(in_planes, width * multiplier, block_stride, norm, inplace))
                in_planes = width * multiplier
        self.layers = nn.Sequential(*blocks)
        self.bn = norm_layer(norm, in_planes)
        self.linear = nn.Linear(in_planes, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, 10]`` of images ``[B, 3, H, W]``."""
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def pgd_attack(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """PGD-10 (L-inf, eps 8/255, step 2/255, random start) by ``torch.autograd.grad`` w.r.t. the input."""
    delta = torch.empty_like(x).uniform_(-EPS, EPS)
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(ATTACK_STEPS):
        delta.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x + delta), y), delta)
        delta = (delta.detach() + ALPHA * grad.sign()).clamp(-EPS, EPS)
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def sgd(model: nn.Module) -> torch.optim.SGD:
    """``SGD(lr 0.01, momentum 0.9, weight_decay 5e-4, nesterov False)``: every row's outer optimizer."""
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, nesterov=False)


def engm_weights(norms: Tensor) -> Tensor:
    """``w_i = 1 / max(n_i, gamma)``."""
    return 1.0 / norms.clamp(min=GAMMA)


# --- the rows ------------------------------------------------------------------------------------


def plain_row(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> Row:
    """The user's script: attack, ``loss.backward()``, ``step()``, ``zero_grad()`` (MSGD and ENGM)."""

    def outer(x_adv: Tensor) -> None:
        F.cross_entropy(model(x_adv), y).backward()
        optimizer.step()
        optimizer.zero_grad()

    return Row(lambda: pgd_attack(model, x, y), outer)


def msgd(norm: str, width: int, x: Tensor, y: Tensor) -> Row:
    """``torch.optim.SGD`` on the mean loss: the baseline."""
    model = PreActResNet18(norm, width).to(x.device)
    return plain_row(model, sgd(model), x, y)


def engm(norm: str, width: int, x: Tensor, y: Tensor, **options: object) -> Row:
    """``make_engm(model, SGD(...), gamma=1.0, **options)`` and the unchanged user script."""
    try:
        from engm_opacus import make_engm
    except ImportError as error:  # pragma: no cover - only before the core exists
        raise NotApplicable(f"engm_opacus.make_engm unavailable: {error}") from error
    model = PreActResNet18(norm, width).to(x.device)
    wrapped, optimizer = make_engm(model, sgd(model), gamma=GAMMA, **options)
    row = plain_row(wrapped, optimizer, x, y)
    row.note = NOTES.get(tuple(sorted(options)), "1 backward (the user's)")
    return row


INPUT_NORM_SCALE = 30.0
"""A fixed input-norm scale for the rows timing non-calibration steps only (its value does not change the cost)."""
INPUT_NORM = {"variant": "input-norm"}
NOTES = {
    ("input_grad_source", "input_norm_scale", "variant"): "attack's last input gradient; weights before the backward; no calibration",
    ("calibrate_every", "input_grad_source", "variant"): "a calibration step (exact norms + book-keeping)",
    ("input_norm_scale", "variant"): "training loss's input gradient; book-keeping weighted gradient",
}


def opacus_ghost(norm: str, width: int, x: Tensor, y: Tensor) -> Row:
    """Opacus fast gradient clipping, noise 0, ``max_grad_norm=gamma``: norm pass + weighted second backward.

    Hooks are disabled during the attack (otherwise every attack backward would compute
    per-example norms); ``out = out + shortcut`` out of place: Opacus's full backward hooks
    refuse an in-place change of a hooked layer's output.
    """
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    model = PreActResNet18(norm, width, inplace=False).to(x.device)
    optimizer = sgd(model)
    try:
        gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=GAMMA, loss_reduction="mean", use_ghost_clipping=True)
    except Exception as error:  # Opacus's validator refuses BatchNorm
        raise NotApplicable(f"Opacus refuses the model: {first_sentence(error)}") from error
    dp = DPOptimizerFastGradientClipping(
        optimizer, noise_multiplier=0.0, max_grad_norm=GAMMA, expected_batch_size=len(x), loss_reduction="mean"
    )
    criterion = DPLossFastGradientClipping(gsm, dp, nn.CrossEntropyLoss(reduction="mean"), loss_reduction="mean")

    def attack() -> Tensor:
        gsm.disable_hooks()
        try:
            return pgd_attack(gsm, x, y)
        finally:
            gsm.enable_hooks()

    def outer(x_adv: Tensor) -> None:
        criterion(gsm(x_adv), y).backward()  # DPLossFastGradientClipping runs both backward passes
        dp.step()
        dp.zero_grad()

    return Row(attack, outer, "2 backward passes; out-of-place residual add (its hooks refuse +=)")


def first_sentence(error: BaseException) -> str:
    """The first sentence of an exception's message; Opacus's validator raises a list of errors, one per layer."""
    errors = error.args[0] if error.args and isinstance(error.args[0], list) else [error]
    text = str(errors[0]).strip().replace("\n", " ").split("(")[0].replace("buffersthat", "buffers that")
    more = f" ({len(errors)} layers)" if len(errors) > 1 else ""
    return f"{type(errors[0]).__name__}: {text.split('. ')[0].strip()}{more}"[:200]


def group_norm_batch_l2():
    """A BackPACK ``BatchL2Grad`` module extension for ``GroupNorm`` (BackPACK 1.7.1 has none).

    Per example ``i``: ``d weight_c = sum_hw b_i,c,hw * xhat_i,c,hw`` and ``d bias_c = sum_hw b_i,c,hw``,
    with ``xhat`` the normalized input and ``b`` the output gradient BackPACK hands over
    (it carries the loss's ``1/B``, like BackPACK's own layers).
    """
    from backpack.extensions.firstorder.base import FirstOrderModuleExtension

    class BatchL2GroupNorm(FirstOrderModuleExtension):
        def __init__(self):
            super().__init__(params=["weight", "bias"])

        def weight(self, ext, module, g_inp, g_out, bp_quantities):  # noqa: D102
            xhat = F.group_norm(module.input0, module.num_groups, eps=module.eps)
            return (g_out[0] * xhat).flatten(2).sum(2).pow(2).sum(1)

        def bias(self, ext, module, g_inp, g_out, bp_quantities):  # noqa: D102
            return g_out[0].flatten(2).sum(2).pow(2).sum(1)

    return BatchL2GroupNorm()


def backpack_l2(norm: str, width: int, x: Tensor, y: Tensor) -> Row:
    """BackPACK ``BatchL2Grad`` norms in the training backward, then a second backward of ``sum_i w_i l_i / B``.

    Only the layers with parameters are extended (first-order extensions need no more);
    the first backward keeps the graph (``retain_graph=True``) for the second.
    """
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad

    model = PreActResNet18(norm, width, inplace=False).to(x.device)
    for module in model.modules():
        if next(module.children(), None) is None and any(True for _ in module.parameters(recurse=False)):
            extend(module)
    criterion = extend(nn.CrossEntropyLoss(reduction="mean"))
    optimizer = sgd(model)
    extension = BatchL2Grad()
    extension.set_module_extension(nn.GroupNorm, group_norm_batch_l2())
    params = [p for p in model.parameters() if p.requires_grad]
    try:  # a probe: BackPACK refuses some layers (training-mode BatchNorm) only in the backward
        with backpack(extension):
            criterion(model(x[:2]), y[:2]).backward()
    except NotImplementedError as error:
        raise NotApplicable(f"BackPACK refuses the model: {first_sentence(error)}") from error
    finally:
        optimizer.zero_grad(set_to_none=True)

    def outer(x_adv: Tensor) -> None:
        logits = model(x_adv)
        with backpack(extension):
            criterion(logits, y).backward(retain_graph=True)
        batch = len(x_adv)
        norms = batch * torch.stack([p.batch_l2 for p in params]).sum(0).sqrt()  # batch_l2 is ||g_i / B||^2
        weights = engm_weights(norms).detach()
        optimizer.zero_grad(set_to_none=True)
        (F.cross_entropy(logits, y, reduction="none") * weights).sum().div(batch).backward()
        optimizer.step()
        optimizer.zero_grad()

    return Row(lambda: pgd_attack(model, x, y), outer, "2 backward passes; GroupNorm extension added here; out-of-place add")


def functorch(norm: str, width: int, x: Tensor, y: Tensor) -> Row:
    """``torch.func``: ``vmap(grad)`` per-example gradients of a ``functional_call``, norms, weighted sum."""
    from torch.func import functional_call, grad, vmap

    if norm == "batch":
        raise NotApplicable("vmap(grad) runs each example as a batch of one: no training-mode BatchNorm statistics")
    model = PreActResNet18(norm, width).to(x.device)
    optimizer = sgd(model)
    names = [name for name, p in model.named_parameters() if p.requires_grad]

    def loss_one(params: Dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, params, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per_example_grads = vmap(grad(loss_one), in_dims=(None, 0, 0))

    def outer(x_adv: Tensor) -> None:
        params = {name: p.detach() for name, p in model.named_parameters() if name in names}
        grads = per_example_grads(params, x_adv, y)
        norms = torch.stack([grads[n].flatten(1).norm(dim=1) for n in names], dim=1).norm(dim=1)
        weights = engm_weights(norms) / len(x_adv)
        for name, p in model.named_parameters():
            if name in grads:
                p.grad = torch.einsum("i,i...->...", weights, grads[name])
        optimizer.step()
        optimizer.zero_grad()

    return Row(lambda: pgd_attack(model, x, y), outer, "vmap(grad): the training pass per example")


BUILDERS: Dict[str, Callable[[str, int, Tensor, Tensor], Row]] = {
    "msgd": msgd,
    "engm": engm,
    "engm-input-norm": lambda norm, width, x, y: engm(
        norm, width, x, y, **INPUT_NORM, input_grad_source="attack", input_norm_scale=INPUT_NORM_SCALE
    ),
    "engm-input-norm-calibration": lambda norm, width, x, y: engm(
        norm, width, x, y, **INPUT_NORM, input_grad_source="attack", calibrate_every=1
    ),
    "engm-input-norm-backward": lambda norm, width, x, y: engm(norm, width, x, y, **INPUT_NORM, input_norm_scale=INPUT_NORM_SCALE),
    "opacus-ghost": opacus_ghost,
    "backpack": backpack_l2,
    "functorch": functorch,
}
LABELS: Dict[str, str] = {
    "msgd": "MSGD",
    "engm": "ENGM (exact)",
    "engm-input-norm": "ENGM (input-norm), step",
    "engm-input-norm-calibration": "ENGM (input-norm), calibration step",
    "engm-input-norm-backward": "ENGM (input-norm), backward source",
    "opacus-ghost": "Opacus ghost",
    "backpack": "BackPACK BatchL2Grad",
    "functorch": "torch.func",
}
MODEL_LABELS: Dict[str, str] = {"preact18-bn": "PreAct ResNet-18, BatchNorm", "preact18-gn": "PreAct ResNet-18, GroupNorm"}


def build_row(method: str, model: str, width: int, x: Tensor, y: Tensor, seed: int) -> Row:
    """Seed, then build ``method`` on ``model`` (``preact18-bn`` / ``preact18-gn``); raises :class:`NotApplicable`."""
    torch.manual_seed(seed)
    return BUILDERS[method](NORMS[model.rsplit("-", 1)[1]], width, x, y)


def batch(size: int, device: torch.device, seed: int) -> Tuple[Tensor, Tensor]:
    """A fixed random CIFAR-shaped batch: ``x`` in ``[0, 1]^{B x 3 x 32 x 32}``, ``y`` in ``0..9``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(size, 3, 32, 32, generator=generator)
    y = torch.randint(0, NUM_CLASSES, (size,), generator=generator)
    return x.to(device), y.to(device)
