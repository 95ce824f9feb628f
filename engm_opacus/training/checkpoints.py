"""Training checkpoints: atomic writes, validated loads, RNG state for bit-identical resume, weights into a model.

A checkpoint is one ``torch.save`` file holding a dict with ``"format": FORMAT`` and
``"version": VERSION``, plus whatever the trainer stores (model, optimizer incl. momentum
buffers, scheduler, RNG states, epoch, best metric, config, history). The model weights are the
plain model's ``state_dict()`` (an ENGM-wrapped model's ``state_dict()`` has the same keys, no
``_module.`` prefix), so they load into the model :func:`engm_opacus.training.models.build_model`
builds. Writes are atomic (:func:`engm_opacus.training.logs.atomic_write`): a crash at any point
leaves either the old checkpoint or the new one, never a partial file. Loading uses
``torch.load(weights_only=True)`` (no arbitrary code from a file), so RNG states are stored as
tensors and plain Python values.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from engm_opacus.training.config import TrainConfig, config_from_payload
from engm_opacus.training.data import DATASET_SHAPES
from engm_opacus.training.logs import PathLike, atomic_write
from engm_opacus.training.models import build_model

FORMAT = "engm-opacus-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("format", "version", "epoch", "model", "config")


class CheckpointError(ValueError):
    """A file given as a checkpoint is missing, unreadable, truncated, or not an engm-opacus checkpoint."""


def atomic_save(payload: Dict[str, Any], path: PathLike) -> Path:
    """``torch.save(payload)`` to ``path`` atomically (see :func:`engm_opacus.training.logs.atomic_write`)."""
    return atomic_write(path, lambda handle: torch.save(payload, handle))


def save_checkpoint(state: Dict[str, Any], path: PathLike) -> Path:
    """Stamp ``state`` with :data:`FORMAT` / :data:`VERSION` and write it atomically to ``path``."""
    return atomic_save({"format": FORMAT, "version": VERSION, **state}, path)


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Load and validate a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: the file is missing, not a torch file, truncated or corrupt, or lacks
            the engm-opacus format stamp or a required key. The message names the file and the fix.
    """
    source = Path(path)
    fix = "Fix: pass a best.pt or last.pt written by `engm-opacus train` (they are written atomically, so the previous one is intact after a crash)."
    if not source.is_file():
        raise CheckpointError(f"Checkpoint {source} does not exist or is not a file. {fix}")
    try:
        payload = torch.load(source, map_location=map_location, weights_only=True)
    except Exception as error:  # zip/pickle errors differ by corruption kind and torch version
        raise CheckpointError(
            f"Checkpoint {source} is unreadable (truncated, corrupt, or not a torch file): "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}. {fix}"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{source} is a torch file but not an engm-opacus checkpoint (no format={FORMAT!r} stamp). {fix}")
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"{source} has checkpoint version {payload.get('version')!r}; this engm-opacus reads version {VERSION}. "
            "Fix: evaluate or resume it with the engm-opacus version that wrote it."
        )
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise CheckpointError(f"Checkpoint {source} lacks {', '.join(missing)}. {fix}")
    return payload


def capture_rng_state(generator: Optional[torch.Generator] = None) -> Dict[str, Any]:
    """Torch (CPU and, if initialized, CUDA), NumPy and Python RNG states, plus ``generator``'s state."""
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }
    if generator is not None:
        state["loader"] = generator.get_state()
    return state


def restore_rng_state(state: Dict[str, Any], generator: Optional[torch.Generator] = None) -> None:
    """Inverse of :func:`capture_rng_state`; restores ``generator`` too when given and saved."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "loader" in state:
        generator.set_state(state["loader"])


def restore_model(model: nn.Module, payload: Dict[str, Any], path: PathLike) -> nn.Module:
    """Load a loaded checkpoint's weights into ``model`` (plain or ENGM-wrapped); return ``model``.

    Raises:
        CheckpointError: the weights do not fit ``model`` (another architecture, width or norm).
    """
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as error:
        recorded = payload.get("config", {}).get("model", "?")
        raise CheckpointError(
            f"Checkpoint {path} has weights that do not fit the model built from its config (model {recorded!r}). "
            "Fix: pass a checkpoint written by engm-opacus train, unmodified, and build the model from its config "
            f"(load_trained_model does). Details: {error}"
        ) from error
    return model


def load_trained_model(path: PathLike, device: Union[str, torch.device] = "cpu") -> Tuple[nn.Module, TrainConfig, Dict[str, Any]]:
    """Rebuild the model a checkpoint was trained with and load its weights.

    Returns:
        ``(model in eval mode on device, its TrainConfig, the checkpoint payload)``.

    Raises:
        CheckpointError: unreadable or foreign file, or weights that do not fit the recorded model.
    """
    payload = load_checkpoint(path, map_location=device)
    config = config_from_payload(payload)
    num_classes, in_channels, _ = DATASET_SHAPES[config.dataset]
    model = build_model(config.model, num_classes=num_classes, in_channels=in_channels, norm=config.norm, width=config.width)
    restore_model(model, payload, path)
    return model.to(device).eval(), config, payload
