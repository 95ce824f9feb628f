"""Public robust checkpoints load: TRADES / RobustBench WideResNet-34-10 and Rice et al. PreAct ResNet-18 key layouts."""

from __future__ import annotations

from typing import Dict

import pytest
import torch

from engm_opacus.training.key_maps import load_reference_state_dict, reference_to_engm_keys
from engm_opacus.training.models import build_model
from tests.training.reference_nets import PreActResNet18, WideResNet

WRN_34_10_STATE_ELEMENTS = 46_182_937
"""Parameters and BatchNorm buffers of WRN-34-10 (10 classes) without TRADES's unused ``sub_block1``."""


def randomized(state: Dict[str, torch.Tensor], seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random weights; BatchNorm running variances positive, batch counters integers."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.randint(0, 1000, value.shape, generator=generator)
        elif key.endswith("running_var"):
            out[key] = torch.rand(value.shape, generator=generator) + 0.5
        else:
            out[key] = torch.randn(value.shape, generator=generator) * 0.1
    return out


def test_trades_wrn_34_10_state_dict_loads_with_every_element_mapped() -> None:
    reference = randomized(WideResNet(depth=34, num_classes=10, widen_factor=10).state_dict())
    assert any(k.startswith("sub_block1.") for k in reference) and "block1.layer.0.convShortcut.weight" in reference
    wrapped = {"state_dict": {f"module.{key}": value for key, value in reference.items()}}  # DataParallel checkpoint
    model = load_reference_state_dict("wrn-34-10", wrapped)
    loaded = model.state_dict()
    assert sum(v.numel() for v in loaded.values()) == WRN_34_10_STATE_ELEMENTS
    used = {k: v for k, v in reference.items() if not k.startswith("sub_block1.")}
    assert sum(v.numel() for v in used.values()) == WRN_34_10_STATE_ELEMENTS
    renamed = reference_to_engm_keys("wrn-34-10", used)
    assert renamed.keys() == loaded.keys()
    assert all(torch.equal(loaded[k], v) for k, v in renamed.items())
    assert torch.equal(loaded["blocks.5.shortcut.weight"], reference["block2.layer.0.convShortcut.weight"])
    assert torch.equal(loaded["bn.running_var"], reference["bn1.running_var"]) and torch.equal(loaded["fc.bias"], reference["fc.bias"])


@pytest.mark.parametrize("name", ["wrn-34-10", "preact-resnet18"])
def test_mapped_weights_compute_the_reference_function(name: str, one_thread: None) -> None:
    torch.manual_seed(0)
    reference = WideResNet(depth=34, num_classes=10, widen_factor=2) if name == "wrn-34-10" else PreActResNet18(num_classes=10, width=8)
    reference.load_state_dict(randomized(reference.state_dict()))
    model = load_reference_state_dict(name, reference.state_dict())
    assert model.fc.out_features == 10 if name == "wrn-34-10" else model.linear.out_features == 10
    reference.eval(), model.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected, actual = reference(x), model(x)
    assert torch.allclose(expected, actual, rtol=1e-4, atol=1e-5), (expected - actual).abs().max()


def test_rice_preact_resnet18_keys_and_an_old_checkpoint_without_batch_counters() -> None:
    reference = randomized(PreActResNet18(width=64).state_dict())
    assert "layer2.0.shortcut.0.weight" in reference and "linear.weight" in reference
    old = {k: v for k, v in reference.items() if not k.endswith("num_batches_tracked")}  # saved before PyTorch 0.4.1
    model = load_reference_state_dict("preact-resnet18", old)
    loaded = model.state_dict()
    assert torch.equal(loaded["layers.2.shortcut.weight"], reference["layer2.0.shortcut.0.weight"])
    assert torch.equal(loaded["layers.7.bn2.weight"], reference["layer4.1.bn2.weight"])
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for k, v in old.items() if "running" not in k)


def test_own_layout_and_opacus_prefix_pass_through() -> None:
    ours = build_model("preact-resnet18", num_classes=10, width=8)
    state = {f"_module.{k}": v for k, v in randomized(ours.state_dict()).items()}
    model = load_reference_state_dict("preact-resnet18", state, model=build_model("preact-resnet18", num_classes=10, width=8))
    assert all(torch.equal(model.state_dict()[k[len("_module."):]], v) for k, v in state.items())


def test_mismatches_list_missing_and_unexpected_keys() -> None:
    reference = WideResNet(depth=34, num_classes=10, widen_factor=1).state_dict()
    broken = {k: v for k, v in reference.items() if not k.startswith("fc.")}
    broken["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as info:
        load_reference_state_dict("wrn-34-10", broken, model=build_model("wrn-34-10", num_classes=10, width=1))
    message = str(info.value)
    assert "missing (2): fc.bias, fc.weight" in message and "unexpected (1): extra.weight" in message and "Fix" in message
    with pytest.raises(ValueError, match=r"wrong shape: fc.bias \(10,\) vs \(100,\), fc.weight"):
        load_reference_state_dict("wrn-34-10", reference, model=build_model("wrn-34-10", num_classes=100, width=1))
    with pytest.raises(ValueError, match="No reference key layout for model 'small-cnn'"):
        load_reference_state_dict("small-cnn", {})
