"""Atomic, validated training checkpoints and the RNG state needed for bit-identical resume.

A checkpoint is one ``torch.save`` file holding a dict with ``"format": FORMAT`` and
``"version": VERSION``, plus whatever the trainer stores (model, optimizer incl. momentum
buffers, scheduler, RNG states, epoch, best metric, config, history). Writes are atomic:
the bytes go to a temporary file in the destination folder, are flushed and fsynced, the
file is renamed over the destination with ``os.replace`` and the folder is fsynced. A crash
at any point leaves either the old checkpoint or the new one, never a partial file.
Loading uses ``torch.load(weights_only=True)`` (no arbitrary code from a file), so RNG
states are stored as tensors and plain Python values.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Optional, Union

import numpy as np
import torch

FORMAT = "engm-opacus-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("format", "version", "epoch", "model", "config")

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A file given as a checkpoint is missing, unreadable, truncated, or not an engm-opacus checkpoint."""


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op on platforms without directory fds)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Create or replace ``path`` atomically with the bytes ``write(handle)`` produces; return the path.

    Temp file in the same folder -> ``flush`` + ``fsync`` -> ``os.replace`` -> ``fsync`` of the
    folder. On any exception (or signal-raised interrupt) the temp file is removed and
    ``path`` is untouched; after a hard kill only a hidden ``.NAME.*.tmp`` file can remain.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    return target


def atomic_save(payload: Dict[str, Any], path: PathLike) -> Path:
    """``torch.save(payload)`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda handle: torch.save(payload, handle))


def atomic_write_text(text: str, path: PathLike) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (logs, JSON results)."""
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


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
