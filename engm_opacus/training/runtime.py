"""Where and how a run executes: torch's CPU thread count, the device, and the seeds of every RNG."""

from __future__ import annotations

import contextlib
import random
from typing import Iterator, Optional, Tuple

import numpy as np
import torch

DEVICES: Tuple[str, ...] = ("auto", "cpu", "cuda")


@contextlib.contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside the block (``None``: unchanged); the old count is restored after."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA if available else CPU; ``cuda`` without a GPU raises ``ValueError``."""
    if name not in DEVICES:
        raise ValueError(f"Unknown device {name!r}. Fix: use one of {', '.join(DEVICES)}.")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA GPU. Fix: use device='cpu' or 'auto'.")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed torch, NumPy and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
