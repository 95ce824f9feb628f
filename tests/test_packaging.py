"""Packaging: the version written once, the license file and py.typed shipped, extras instead of optional core dependencies."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

import engm_opacus
from tests.helpers.imports import PACKAGE_DIR, imported_modules

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]


def test_version_is_written_once_in_the_package() -> None:
    assert "version" not in PROJECT and PROJECT["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "engm_opacus.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", engm_opacus.__version__)
    assert importlib.metadata.version("engm-opacus") == engm_opacus.__version__, "reinstall: pip install -e '.[dev]'"
    citation = (ROOT / "docs" / "citation.md").read_text(encoding="utf-8")
    assert f"version = {{{engm_opacus.__version__}}}" in citation


def test_license_file_and_py_typed_are_declared_for_the_wheel() -> None:
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text(encoding="utf-8")[:200]
    assert "Version 2.0, January 2004" in (ROOT / "LICENSE").read_text(encoding="utf-8")[:300]
    assert (PACKAGE_DIR / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["engm_opacus"]


def test_autoattack_and_plots_are_extras_and_torchattacks_is_gone() -> None:
    core = " ".join(PROJECT["dependencies"])
    assert "matplotlib" not in core and "pyautoattack" not in core and "torchattacks" not in core
    extras = PROJECT["optional-dependencies"]
    assert not any("torchattacks" in r for reqs in extras.values() for r in reqs)
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        assert not any(name.split(".")[0] == "torchattacks" for name in imported_modules(path)), path
        top_level = {name.split(".")[0] for name in _module_level_imports(path)}
        assert not top_level & {"matplotlib", "pyautoattack"}, f"{path}: import the extras on use (training/extras.py)"


def _module_level_imports(path: Path) -> set[str]:
    import ast

    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names
