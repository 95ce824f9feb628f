"""Models for adversarial training, registered by name: a small CNN, PreAct ResNet-18 and WideResNet-34-10.

The ResNets follow the reference AT codebases layer for layer: PreAct ResNet-18 as in
Rice et al. (2020, "Overfitting in adversarially robust deep learning",
``preactresnet.py``) and WideResNet as in Zhang et al. (2019, TRADES, ``wideresnet.py``),
without TRADES's ``sub_block1`` (built there but never used in ``forward``; a parameter
that gets no gradient would also get no per-example gradient). Global average pooling is
``AdaptiveAvgPool2d(1)``, which equals the originals' fixed ``avg_pool2d(4)`` / ``(8)``
on 32x32 inputs and also accepts other input sizes.

TinyImageNet (64x64, 200 classes): the models are built with ``num_classes=200`` and keep the
CIFAR stem (3x3 stride-1 convolution, no max-pool), as AT codes commonly do for
TinyImageNet; the stages' strides 1, 2, 2, 2 leave an 8x8 map (instead of 4x4),
which the global average pool reduces to one vector, so the head is ``Linear(512, 200)``
(11,269,640 parameters at width 64). Each layer costs 4x its 32x32 FLOPs.

Every model takes ``norm``: ``"batch"`` (``BatchNorm2d``, what AT users train) or
``"group"`` (``GroupNorm`` with ``gcd(32, C)`` groups over ``C`` channels; Opacus's
``ModuleValidator.fix`` uses ``min(32, C)``, which equals ``gcd(32, C)`` for the
power-of-two widths used here). GroupNorm keeps every example's gradient its own, so
it is the training default; BatchNorm mixes the examples of a batch, and ENGM on it uses
the per-example definition of :mod:`engm_opacus.per_example`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Literal, Tuple, TypeVar

from torch import Tensor, nn
from torch.nn import functional as F

Norm = Literal["batch", "group"]
NORMS: Tuple[str, ...] = ("batch", "group")
SMALL_CNN_POOL = 4

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])
MODELS: Dict[str, Callable[..., nn.Module]] = {}
"""The registry: model name -> builder (``num_classes``, ``in_channels``, ``norm``, ``width`` keywords)."""


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register a builder under ``name`` for :func:`build_model` (and ``--model`` / ``TrainConfig.model``).

    The builder takes the keywords ``num_classes``, ``in_channels``, ``norm`` and ``width``, each
    with a default. Registering a name twice raises ``ValueError``.
    """

    def register(builder: Builder) -> Builder:
        if name in MODELS:
            raise ValueError(f"A model named {name!r} is already registered ({MODELS[name].__qualname__}). Fix: pick another name.")
        MODELS[name] = builder
        return builder

    return register


def norm_layer(norm: Norm, channels: int) -> nn.Module:
    """A 2-d normalization layer over ``channels``: ``BatchNorm2d`` or ``GroupNorm(gcd(32, C), C)``."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    raise ValueError(f"Unknown norm {norm!r}. Fix: use one of {', '.join(NORMS)}.")


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{key} must be a positive int, got {value!r}.")


class SmallCNN(nn.Module):
    """Three 3x3 convolutions (stride 1, 2, 2) with norm + ReLU, 4x4 average pool, flatten, linear head.

    Channels ``width, 2*width, 2*width``. Sized for the 16x16 digits images (the pool is
    the identity on their 4x4 feature maps; other sizes are pooled to 4x4): with the
    default ``width=16`` it has 19,338 parameters and trains with PGD-10 and exact
    per-example gradients in seconds per epoch on a CPU. (A global-average-pool head
    learned several times slower on digits under adversarial training.)
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, norm: Norm = "group", width: int = 16):
        super().__init__()
        _check_positive(num_classes=num_classes, in_channels=in_channels, width=width)
        channels = (width, 2 * width, 2 * width)
        layers: list[nn.Module] = []
        previous = in_channels
        for channel, stride in zip(channels, (1, 2, 2)):
            layers += [nn.Conv2d(previous, channel, 3, stride=stride, padding=1), norm_layer(norm, channel), nn.ReLU()]
            previous = channel
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(SMALL_CNN_POOL)
        self.head = nn.Linear(previous * SMALL_CNN_POOL**2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` of images ``[B, in_channels, H, W]``."""
        return self.head(self.pool(self.features(x)).flatten(1))


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016): ``out = conv(relu(n(conv(relu(n(x)))))) + shortcut``."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, norm: Norm):
        super().__init__()
        self.bn1 = norm_layer(norm, in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm_layer(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """``conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut``, the shortcut taken after the first activation."""
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreAct ResNet-18: stem conv, four stages of two blocks (``width * (1, 2, 4, 8)`` channels), norm, ReLU, pool, linear.

    The stem is a 3x3 stride-1 convolution (no max-pool) and the stages have strides 1, 2, 2, 2:
    the final map is ``H/8 x W/8`` (4x4 for CIFAR, 8x8 for TinyImageNet's 64x64), averaged to one
    ``8 * width`` vector by ``AdaptiveAvgPool2d(1)`` before the linear head.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, norm: Norm = "batch", width: int = 64):
        super().__init__()
        _check_positive(num_classes=num_classes, in_channels=in_channels, width=width)
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        blocks: list[nn.Module] = []
        in_planes = width
        for multiplier, stride in zip((1, 2, 4, 8), (1, 2, 2, 2)):
            planes = width * multiplier
            for block_stride in (stride, 1):
                blocks.append(PreActBlock(in_planes, planes, block_stride, norm))
                in_planes = planes
        self.layers = nn.Sequential(*blocks)
        self.bn = norm_layer(norm, in_planes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` of images ``[B, in_channels, H, W]``."""
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        return self.linear(self.pool(out).flatten(1))


class WideBasicBlock(nn.Module):
    """WideResNet basic block (TRADES ``BasicBlock``), pre-activation, optional dropout between the convolutions.

    As in the reference code, when the block changes the channel count the shortcut is a
    1x1 convolution of the *activated* input, otherwise the identity of the raw input.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, norm: Norm, drop_rate: float):
        super().__init__()
        self.bn1 = norm_layer(norm, in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm_layer(norm, out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.shortcut: nn.Module | None = None
        if not self.equal_in_out:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """``conv2(dropout(relu(bn2(conv1(a))))) + shortcut`` with ``a = relu(bn1(x))``."""
        activated = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(activated)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.shortcut is None else self.shortcut(activated)
        return out + shortcut


class WideResNet(nn.Module):
    """WideResNet-``depth``-``widen_factor`` (Zagoruyko & Komodakis 2016) as in the TRADES codebase.

    ``n = (depth - 4) / 6`` blocks per stage, channels ``16, 16k, 32k, 64k`` with
    ``k = widen_factor``, strides 1, 2, 2. ``depth=34, widen_factor=10`` is WRN-34-10.
    """

    def __init__(
        self,
        depth: int = 34,
        widen_factor: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        norm: Norm = "batch",
        drop_rate: float = 0.0,
    ):
        super().__init__()
        _check_positive(depth=depth, widen_factor=widen_factor, num_classes=num_classes, in_channels=in_channels)
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4 (10, 16, 22, 28, 34, ...), got {depth}.")
        n = (depth - 4) // 6
        channels = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, stride=1, padding=1, bias=False)
        blocks: list[nn.Module] = []
        for stage, stride in enumerate((1, 2, 2)):
            for index in range(n):
                in_planes = channels[stage] if index == 0 else channels[stage + 1]
                blocks.append(WideBasicBlock(in_planes, channels[stage + 1], stride if index == 0 else 1, norm, drop_rate))
        self.blocks = nn.Sequential(*blocks)
        self.bn = norm_layer(norm, channels[3])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[3], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """TRADES initialization: conv ``N(0, 2/(k*k*out))``, norm weight 1 / bias 0, linear bias 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` of images ``[B, in_channels, H, W]``."""
        out = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(self.pool(out).flatten(1))


@register_model("small-cnn")
def small_cnn(num_classes: int = 10, in_channels: int = 1, norm: Norm = "group", width: int = 16) -> SmallCNN:
    """The default model for digits; see :class:`SmallCNN`."""
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, norm=norm, width=width)


@register_model("preact-resnet18")
def preact_resnet18(num_classes: int = 10, in_channels: int = 3, norm: Norm = "batch", width: int = 64) -> PreActResNet18:
    """PreAct ResNet-18 (Rice et al. 2020); ``width=64`` is the standard model, smaller widths are for tests."""
    return PreActResNet18(num_classes=num_classes, in_channels=in_channels, norm=norm, width=width)


@register_model("wrn-34-10")
def wrn_34_10(num_classes: int = 10, in_channels: int = 3, norm: Norm = "batch", width: int = 10) -> WideResNet:
    """WRN-34-10 (TRADES codebase); ``width`` is the widen factor (10), smaller ones are for tests."""
    return WideResNet(34, width, num_classes, in_channels, norm)


def build_model(name: str, **options: Any) -> nn.Module:
    """Build the model registered as ``name``.

    Args:
        name: one of :data:`MODELS` (``"small-cnn"``, ``"preact-resnet18"``, ``"wrn-34-10"``).
        **options: keyword arguments of the builder: ``num_classes``, ``in_channels``, ``norm``
            (``"batch"`` or ``"group"``) and ``width`` (small-cnn: 16, preact-resnet18: 64, wrn-34-10:
            the widen factor 10). An option set to ``None`` keeps the builder's default.

    Raises:
        ValueError: unknown ``name`` (the message lists the registered ones) or ``norm``.
    """
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}. Fix: use one of {', '.join(MODELS)} (or register yours with @register_model).")
    return MODELS[name](**{key: value for key, value in options.items() if value is not None})
