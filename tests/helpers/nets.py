"""Tiny float64 networks and data for the exactness tests (inputs 2x6x6, 3 classes).

Every builder takes a seed so that two calls give identical models (one for the library, one
for the naive reference). The nets cover the script shapes the contract promises: GroupNorm and
BatchNorm PreAct-style blocks with ``out += shortcut`` and ``ReLU(inplace=True)``, convolutions
with every ``padding_mode``, an Embedding off the float-input path, frozen parameters, and a
layer no per-example rule supports.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

IN_SHAPE = (2, 6, 6)
CLASSES = 3
VOCAB = 7
TOKENS = 3
FEATURES = 5


def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build().double()


def mlp(seed: int = 0) -> nn.Module:
    """Flatten -> Linear -> Tanh -> Linear."""
    return _seeded(
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(72, 8), nn.Tanh(), nn.Linear(8, CLASSES)), seed
    )


def groupnorm_cnn(seed: int = 0) -> nn.Module:
    """Two convolutions with GroupNorm, then a Linear head."""
    return _seeded(
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.GroupNorm(2, 4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, stride=2, padding=1),
            nn.GroupNorm(2, 4),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(36, CLASSES),
        ),
        seed,
    )


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    if kind == "groupnorm":
        return nn.GroupNorm(2, channels)
    raise ValueError(kind)


class PreActBlock(nn.Module):
    """PreAct ResNet block as in the reference AT code: norm-ReLU-conv twice, ``out += shortcut``."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str) -> None:
        super().__init__()
        self.bn1 = _norm(norm, in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _norm(norm, planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.relu2(self.bn2(out)))
        out += shortcut
        return out


class PreActNet(nn.Module):
    """Stem conv, an identity-shortcut block, a strided conv-shortcut block, norm-ReLU, pool, Linear."""

    def __init__(self, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.layer1 = PreActBlock(4, 4, 1, norm)
        self.layer2 = PreActBlock(4, 6, 2, norm)
        self.bn = _norm(norm, 6)
        self.relu = nn.ReLU(inplace=True)
        self.linear = nn.Linear(6, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer2(self.layer1(self.conv1(x)))
        out = self.relu(self.bn(out))
        out = nn.functional.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def preact_batchnorm(seed: int = 0) -> nn.Module:
    """PreAct-style net with BatchNorm2d (non-trivial affine parameters)."""
    model = _seeded(lambda: PreActNet("batchnorm"), seed)
    _randomize_affine(model)
    return model


def preact_groupnorm(seed: int = 0) -> nn.Module:
    """PreAct-style net with GroupNorm (non-trivial affine parameters)."""
    model = _seeded(lambda: PreActNet("groupnorm"), seed)
    _randomize_affine(model)
    return model


def _randomize_affine(model: nn.Module) -> None:
    """Normalization layers start at weight 1, bias 0; move them off that point (same seed, same values)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)) and module.weight is not None:
                module.weight.add_(0.2 * torch.randn_like(module.weight))
                module.bias.add_(0.1 * torch.randn_like(module.bias))


class BatchNormVariantNet(nn.Module):
    """Conv -> BatchNorm2d -> ReLU -> pool -> Linear -> BatchNorm1d -> Tanh -> Linear, BatchNorm options ``kw``."""

    def __init__(self, **kw: object) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn2d = nn.BatchNorm2d(4, **kw)
        self.fc = nn.Linear(4, 4)
        self.bn1d = nn.BatchNorm1d(4, **kw)
        self.head = nn.Linear(4, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = nn.functional.relu(self.bn2d(self.conv(x))).mean((2, 3))
        return self.head(torch.tanh(self.bn1d(self.fc(hidden))))


def batchnorm_variant(seed: int = 0, **kw: object) -> nn.Module:
    """``BatchNormVariantNet(**kw)``: e.g. ``track_running_stats=False`` (batch statistics in eval mode
    too), ``momentum=None`` (cumulative average), ``affine=False`` (no BatchNorm parameters)."""
    model = _seeded(lambda: BatchNormVariantNet(**kw), seed)
    _randomize_affine(model)
    return model


def padded_conv(padding_mode: str, seed: int = 0) -> nn.Module:
    """Two convolutions with ``padding_mode`` (reflect / replicate / circular / zeros), then Linear."""
    return _seeded(
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1, padding_mode=padding_mode),
            nn.Tanh(),
            nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode=padding_mode),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(36, CLASSES),
        ),
        seed,
    )


class EmbeddingNet(nn.Module):
    """An Embedding on integer token ids next to a Linear on float features (the Embedding is off
    the float-input path), summed, Tanh, Linear head. ``forward(tokens, features)``."""

    def __init__(self, padding_idx: int | None = None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 4, padding_idx=padding_idx)
        self.features = nn.Linear(FEATURES, 4)
        self.head = nn.Linear(4, CLASSES)

    def forward(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        hidden = self.embedding(tokens).mean(dim=1) + self.features(features)
        return self.head(torch.tanh(hidden))


def embedding_net(seed: int = 0, padding_idx: int | None = None) -> nn.Module:
    """``EmbeddingNet``; with ``padding_idx`` the padding row gets no gradient (autograd's rule)."""
    return _seeded(lambda: EmbeddingNet(padding_idx), seed)


def frozen_net(seed: int = 0) -> nn.Module:
    """Conv (frozen) -> Tanh -> Linear (weight trainable, bias frozen) -> Tanh -> Linear (trainable)."""
    model = _seeded(
        lambda: nn.Sequential(
            nn.Conv2d(2, 2, 3, padding=1),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(72, 6),
            nn.Tanh(),
            nn.Linear(6, CLASSES),
        ),
        seed,
    )
    model[0].requires_grad_(False)
    model[3].bias.requires_grad_(False)
    return model


class ScaleByParam(nn.Module):
    """A custom layer that multiplies by its own ``nn.Parameter``: no per-example rule exists for it."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def with_custom_layer(seed: int = 0, trainable: bool = True) -> nn.Module:
    """MLP whose hidden layer goes through a ``ScaleByParam`` named ``rescale``."""
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("flatten", nn.Flatten())
    model.add_module("fc1", nn.Linear(72, 8))
    model.add_module("rescale", ScaleByParam(8))
    model.add_module("act", nn.Tanh())
    model.add_module("fc2", nn.Linear(8, CLASSES))
    model.rescale.requires_grad_(trainable)
    return model.double()


def images(batch: int, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs in [0, 1] of shape ``[batch, 2, 6, 6]`` and labels in ``[0, 3)``."""
    x = torch.rand(batch, *IN_SHAPE, generator=generator, dtype=dtype)
    y = torch.randint(0, CLASSES, (batch,), generator=generator)
    return x, y


def tokens_and_features(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids ``[batch, 3]`` (long), float64 features ``[batch, 5]``, labels ``[batch]``."""
    tokens = torch.randint(0, VOCAB, (batch, TOKENS), generator=generator)
    features = torch.randn(batch, FEATURES, generator=generator, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (batch,), generator=generator)
    return tokens, features, y
