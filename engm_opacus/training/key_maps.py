"""Load public robust checkpoints (TRADES / RobustBench / Rice et al. key layouts) into this library's ResNets.

This library's WRN-34-10 and PreAct ResNet-18 (:mod:`engm_opacus.training.models`) compute the
same functions with the same parameter shapes as the reference code, but name their modules
differently. :func:`reference_to_engm_keys` renames a reference ``state_dict``:

* WideResNet (TRADES ``wideresnet.py``; RobustBench ``model_zoo/architectures/wide_resnet.py``):
  ``conv1``; ``block{s}.layer.{j}.{bn1,conv1,bn2,conv2,convShortcut}`` (``s = 1, 2, 3``,
  ``j < n = (depth - 4) / 6``); ``bn1``; ``fc``  ->  ``conv1``;
  ``blocks.{(s - 1) n + j}.{bn1,conv1,bn2,conv2,shortcut}``; ``bn``; ``fc``. TRADES's
  ``sub_block1`` (built but never used in ``forward``) is dropped.
* PreAct ResNet-18 (Rice et al. ``preactresnet.py``; RobustBench ``PreActResNet``):
  ``conv1``; ``layer{s}.{j}.{bn1,conv1,bn2,conv2,shortcut.0}`` (``s = 1..4``, ``j = 0, 1``);
  ``bn``; ``linear``  ->  ``conv1``; ``layers.{2 (s - 1) + j}.{bn1,conv1,bn2,conv2,shortcut}``;
  ``bn``; ``linear``.

Wrappers are unwrapped first: a ``{"state_dict": ...}`` / ``{"model_state_dict": ...}`` /
``{"model": ...}`` container and the ``module.`` (``DataParallel``) and ``_module.`` (Opacus)
key prefixes. Keys already in this library's layout pass through unchanged. BatchNorm's
``num_batches_tracked`` (absent from checkpoints saved before PyTorch 0.4.1) is filled with 0
when missing; it does not affect evaluation-mode outputs.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from engm_opacus.training.models import build_model

StateDict = Dict[str, torch.Tensor]
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
PREFIXES = ("module.", "_module.")
WRN_BLOCK = re.compile(r"^block([1-3])\.layer\.(\d+)\.(bn1|conv1|bn2|conv2|convShortcut)\.(.+)$")
PREACT_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.(bn1|conv1|bn2|conv2|shortcut\.0)\.(.+)$")
PREACT_BLOCKS_PER_STAGE = 2
DROPPED = re.compile(r"^sub_block1\.")
"""Reference keys with no counterpart here (TRADES's unused ``sub_block1``)."""


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> StateDict:
    """The tensor ``state_dict`` inside ``checkpoint``: unwrap a container key and ``module.`` / ``_module.`` prefixes."""
    state: Mapping[str, Any] = checkpoint
    for key in WRAPPER_KEYS:
        inner = state.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            state = inner
            break
    out: StateDict = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"Entry {key!r} of the state_dict is a {type(value).__name__}, not a tensor. Fix: pass the model's "
                f"state_dict (or a dict holding it under one of {', '.join(WRAPPER_KEYS)})."
            )
        for prefix in PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _wrn_blocks_per_stage(state: Mapping[str, torch.Tensor]) -> int:
    indices = [int(m.group(2)) for m in map(WRN_BLOCK.match, state) if m is not None]
    return max(indices) + 1 if indices else 0


def _wrn_key(key: str, blocks_per_stage: int) -> Optional[str]:
    match = WRN_BLOCK.match(key)
    if match is not None:
        stage, index, layer, rest = match.groups()
        layer = "shortcut" if layer == "convShortcut" else layer
        return f"blocks.{(int(stage) - 1) * blocks_per_stage + int(index)}.{layer}.{rest}"
    if key.startswith("bn1."):
        return "bn." + key[len("bn1."):]
    return None


def _preact_key(key: str, blocks_per_stage: int) -> Optional[str]:
    match = PREACT_BLOCK.match(key)
    if match is not None:
        stage, index, layer, rest = match.groups()
        layer = "shortcut" if layer == "shortcut.0" else layer
        return f"layers.{(int(stage) - 1) * blocks_per_stage + int(index)}.{layer}.{rest}"
    return None


REFERENCE_LAYOUTS: Dict[str, Tuple[str, Callable[[str, int], Optional[str]]]] = {
    "wrn-34-10": ("TRADES / RobustBench WideResNet", _wrn_key),
    "preact-resnet18": ("Rice et al. / RobustBench PreActResNet", _preact_key),
}
"""Model name -> (reference layout, key renamer); keys the renamer leaves (``None``) keep their name."""


def reference_to_engm_keys(model_name: str, checkpoint: Mapping[str, Any]) -> StateDict:
    """``checkpoint`` (a reference or this library's ``state_dict``, possibly wrapped) with this library's key names.

    Raises:
        ValueError: ``model_name`` has no known reference layout, or an entry is not a tensor.
    """
    if model_name not in REFERENCE_LAYOUTS:
        raise ValueError(f"No reference key layout for model {model_name!r}. Fix: use one of {', '.join(REFERENCE_LAYOUTS)}.")
    state = unwrap_state_dict(checkpoint)
    rename = REFERENCE_LAYOUTS[model_name][1]
    per_stage = _wrn_blocks_per_stage(state) if model_name == "wrn-34-10" else PREACT_BLOCKS_PER_STAGE
    return {rename(key, per_stage) or key: value for key, value in state.items() if not DROPPED.match(key)}


def _infer_build_options(model_name: str, state: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """``num_classes``, ``in_channels`` and ``width`` from the shapes of a state_dict in this library's layout."""
    head = "fc.weight" if model_name == "wrn-34-10" else "linear.weight"
    options: Dict[str, Any] = {"norm": "batch"}
    if head in state:
        options["num_classes"] = int(state[head].shape[0])
    if "conv1.weight" in state:
        options["in_channels"] = int(state["conv1.weight"].shape[1])
        if model_name == "preact-resnet18":
            options["width"] = int(state["conv1.weight"].shape[0])
    if model_name == "wrn-34-10" and "blocks.0.conv1.weight" in state:
        options["width"] = int(state["blocks.0.conv1.weight"].shape[0]) // 16
    return options


def load_reference_state_dict(model_name: str, checkpoint: Mapping[str, Any], model: Optional[nn.Module] = None) -> nn.Module:
    """Load a TRADES / RobustBench / Rice et al. ``state_dict`` into this library's ``model_name``; return the model.

    Args:
        model_name: ``"wrn-34-10"`` or ``"preact-resnet18"``.
        checkpoint: the reference ``state_dict`` (or a dict holding it under ``state_dict`` /
            ``model_state_dict`` / ``model``; ``module.`` prefixes are removed). This library's
            own layout is accepted too.
        model: the model to load into; ``None`` builds ``model_name`` with BatchNorm and the
            ``num_classes`` / ``in_channels`` / width read from the weights' shapes.

    Returns:
        ``model`` with every parameter and buffer taken from ``checkpoint`` (strict).

    Raises:
        ValueError: keys that do not map (listing the missing and the unexpected ones, renamed
            where a rule applied) or shape mismatches.
    """
    state = reference_to_engm_keys(model_name, checkpoint)
    if model is None:
        model = build_model(model_name, **_infer_build_options(model_name, state))
    expected = model.state_dict()
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        layout = REFERENCE_LAYOUTS[model_name][0]
        details = [
            f"missing ({len(missing)}): {', '.join(missing)}" if missing else "",
            f"unexpected ({len(unexpected)}): {', '.join(unexpected)}" if unexpected else "",
            "wrong shape: " + ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong_shape)
            if wrong_shape else "",
        ]
        raise ValueError(
            f"The state_dict does not fit {model_name} ({layout} layout, or this library's): "
            + "; ".join(d for d in details if d)
            + ". Fix: pass the matching model's weights (depth, width, number of classes, BatchNorm)."
        )
    model.load_state_dict(state, strict=True)
    return model
