"""The package's layers: lower layers never import upper ones; the AT layer and the optimizers never import each other.

Layers, bottom to top (issue 12): ``functional`` (the math) <- ``per_example`` (recording and
per-layer rules) <- ``optim`` <- ``wrap``; ``at`` beside them (any torch optimizer); then
``training`` <- ``experiments`` <- ``cli``. Every module also stays under 400 lines and opens
with a one-line docstring saying its job.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers.imports import PACKAGE_DIR, imported_modules, module_name

ALLOWED = {
    "functional": {"functional"},
    "per_example": {"functional", "per_example"},
    "optim": {"functional", "per_example", "optim"},
    "wrap": {"functional", "per_example", "optim", "wrap"},
    "at": {"at"},
    "training": {"functional", "per_example", "optim", "wrap", "at", "training", "<root>"},
    "experiments": {"functional", "per_example", "optim", "wrap", "at", "training", "experiments", "<root>"},
    "cli": {"functional", "per_example", "optim", "wrap", "at", "training", "experiments", "cli", "<root>"},
}
"""Per layer, the layers its modules may import (``<root>``: the package ``engm_opacus`` itself)."""

SOURCES = sorted(p for p in PACKAGE_DIR.rglob("*.py") if p.parent != PACKAGE_DIR or p.stem not in ("__init__", "__main__"))


LAYERS = {p.stem if p.is_file() else p.name for p in PACKAGE_DIR.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}


def layer_of(name: str) -> str:
    """``engm_opacus.optim.engm`` -> ``optim``; ``engm_opacus`` and its re-exported names -> ``<root>``."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "<root>"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_module_imports_only_its_own_and_lower_layers(path: Path) -> None:
    layer = layer_of(module_name(path))
    assert layer in ALLOWED, f"{module_name(path)} is in no known layer: add it to ALLOWED"
    for name in imported_modules(path):
        if name == "engm_opacus" or name.startswith("engm_opacus."):
            target = layer_of(name)
            assert target in ALLOWED[layer], f"{module_name(path)} ({layer}) imports {name} ({target})"


def test_the_rule_would_catch_upward_imports() -> None:
    """The checker itself: an optimizer importing the AT layer, or the core importing the root, is reported."""
    assert layer_of("engm_opacus.at.step") not in ALLOWED["optim"]
    assert layer_of("engm_opacus.train") not in ALLOWED["per_example"]  # a lazily re-exported name is the root
    assert layer_of("engm_opacus.training.loop") not in ALLOWED["at"]


@pytest.mark.parametrize("path", sorted(PACKAGE_DIR.rglob("*.py")), ids=lambda p: module_name(p))
def test_module_is_small_and_says_its_job(path: Path) -> None:
    source = path.read_text(encoding="utf-8")
    assert len(source.splitlines()) <= 400, f"{module_name(path)} has {len(source.splitlines())} lines"
    docstring = ast.get_docstring(ast.parse(source))
    assert docstring and docstring.strip().splitlines()[0].strip(), f"{module_name(path)} has no one-line docstring"
