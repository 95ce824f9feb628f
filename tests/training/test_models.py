"""Model registry, reference parameter counts, norm variants, and ENGM support (GroupNorm and BatchNorm)."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from engm_opacus import make_engm
from engm_opacus.training.models import MODELS, WideResNet, build_model, norm_layer, preact_resnet18, register_model, small_cnn

TINY_WIDTH = {"small-cnn": 4, "preact-resnet18": 4, "wrn-34-10": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_reference_parameter_counts() -> None:
    """The published sizes: PreAct ResNet-18 11,172,170 (Rice et al.) and WRN-34-10 46,160,474 (TRADES), CIFAR-10 heads."""
    with torch.device("meta"):
        assert parameter_count(preact_resnet18(num_classes=10, norm="batch")) == 11_172_170
        assert parameter_count(WideResNet(34, 10, num_classes=10, norm="batch")) == 46_160_474
        # GroupNorm has the same affine parameters as BatchNorm
        assert parameter_count(build_model("wrn-34-10", norm="group")) == 46_160_474


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("in_channels,size", [(1, 16), (3, 32)])
def test_forward_shape(name: str, in_channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=in_channels, width=TINY_WIDTH[name])
    assert model(torch.rand(3, in_channels, size, size)).shape == (3, 7)


@pytest.mark.parametrize("norm", ["group", "batch"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_takes_an_engm_step(name: str, norm: str) -> None:
    """Group-norm models pass Opacus's validator; with either norm, one ENGM step sees 4 finite per-example norms."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=5, in_channels=3, norm=norm, width=TINY_WIDTH[name])
    if norm == "group":
        assert ModuleValidator.validate(model, strict=False) == []
    wrapped, optimizer = make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.cross_entropy(wrapped(torch.rand(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()
    norms = optimizer.last_step.per_example_norms
    assert norms.shape == (4,) and bool(torch.isfinite(norms).all()) and bool((norms > 0).all())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_norm_choice_swaps_every_normalization_layer(name: str) -> None:
    batch = build_model(name, in_channels=3, norm="batch", width=TINY_WIDTH[name])
    group = build_model(name, in_channels=3, norm="group", width=TINY_WIDTH[name])
    batch_norms = [m.num_features for m in batch.modules() if isinstance(m, nn.BatchNorm2d)]
    group_norms = [m.num_channels for m in group.modules() if isinstance(m, nn.GroupNorm)]
    assert batch_norms and batch_norms == group_norms
    assert not any(isinstance(m, nn.GroupNorm) for m in batch.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in group.modules())


@pytest.mark.parametrize("channels", [4, 16, 48, 64, 640])
def test_group_norm_groups(channels: int) -> None:
    layer = norm_layer("group", channels)
    assert isinstance(layer, nn.GroupNorm)
    assert layer.num_groups == math.gcd(32, channels) and channels % layer.num_groups == 0


def test_width_scales_small_cnn() -> None:
    assert parameter_count(small_cnn(width=8)) < parameter_count(small_cnn(width=16))
    assert [m.out_channels for m in small_cnn(width=8).modules() if isinstance(m, nn.Conv2d)] == [8, 16, 16]


def test_registry_builds_by_name_and_refuses_duplicates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("engm_opacus.training.models.MODELS", dict(MODELS))  # the registration is undone after the test

    @register_model("tiny-linear")
    def tiny_linear(num_classes: int = 10, in_channels: int = 1, norm: str = "group", width: int = 3) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * width * width, num_classes))

    model = build_model("tiny-linear", num_classes=4, in_channels=2, width=None)
    assert model(torch.rand(5, 2, 3, 3)).shape == (5, 4)
    with pytest.raises(ValueError, match="already registered"):
        register_model("tiny-linear")(tiny_linear)


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="small-cnn, preact-resnet18, wrn-34-10"):
        build_model("resnet50")
    with pytest.raises(ValueError, match="batch, group"):
        build_model("small-cnn", norm="layer")
    with pytest.raises(ValueError, match="6n \\+ 4"):
        WideResNet(depth=33)
    with pytest.raises(ValueError, match="positive int"):
        small_cnn(width=0)
