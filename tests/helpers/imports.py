"""The ``engm_opacus`` modules a source file imports, read with ``ast`` (nothing is executed)."""

from __future__ import annotations

import ast
from pathlib import Path

import engm_opacus

PACKAGE_DIR = Path(engm_opacus.__file__).parent


def module_name(path: Path) -> str:
    """``engm_opacus.optim.engm`` for ``.../engm_opacus/optim/engm.py`` (packages: their ``__init__``'s name)."""
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every ``import`` / ``from ... import`` in ``path`` (relative imports resolved)."""
    package = ".".join(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names
