"""Optional dependencies (the ``[eval]`` and ``[plots]`` extras): imported on first use, or an error naming the pip command.

The core (``make_engm``, the optimizers, the AT layer, the training loop) needs neither. AutoAttack
(``pyautoattack``) is only needed by ``evaluate(..., autoattack=True)`` / ``engm-opacus eval``;
matplotlib only where the benchmark and diagnostics plots are drawn.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Dict

EXTRAS: Dict[str, str] = {"pyautoattack": "eval", "matplotlib": "plots"}
"""Top-level module -> the extra of ``engm-opacus`` that installs it."""


class MissingExtraError(ModuleNotFoundError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def install_hint(module: str) -> str:
    """``pip install 'engm-opacus[eval]'`` for ``pyautoattack`` (the extra that provides ``module``)."""
    return f"pip install 'engm-opacus[{EXTRAS[module.split('.')[0]]}]'"


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (a key of :data:`EXTRAS` or one of its submodules) or say which extra installs it.

    Args:
        module: e.g. ``"pyautoattack"`` or ``"matplotlib.figure"``.
        purpose: what needs it, for the message (e.g. ``"AutoAttack"``).

    Raises:
        MissingExtraError: the package is not installed (an ``ImportError`` raised *inside* an
            installed package is re-raised unchanged: that is a broken installation, not a missing extra).
    """
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as error:
        if error.name is not None and error.name.split(".")[0] != top:
            raise
        raise MissingExtraError(
            f"{purpose} needs the optional package {top!r}, which is not installed. "
            f"Fix: {install_hint(module)} (in a clone: pip install -e '.[{EXTRAS[top]}]'), or pip install {top}.",
            name=top,
        ) from error
