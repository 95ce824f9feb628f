"""The AT layer never imports the ENGM core (``optim``, ``per_example``, ``wrap``): it works with any optimizer."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import engm_opacus
from tests.helpers.imports import imported_modules

AT_DIR = Path(engm_opacus.__file__).parent / "at"
CORE = ("engm_opacus.optim", "engm_opacus.per_example", "engm_opacus.wrap")


def test_at_sources_import_no_core_module() -> None:
    """Neither a core module nor the package root (whose body imports the core)."""
    files = sorted(AT_DIR.rglob("*.py"))
    assert len(files) >= 8
    for path in files:
        for name in imported_modules(path):
            where = path.relative_to(AT_DIR.parent)
            assert not name.startswith(CORE), f"{where} imports {name}"
            assert name != "engm_opacus", f"{where} imports the package root, which loads the core"
            assert not (name.startswith("engm_opacus.") and name.split(".")[1] in engm_opacus.__all__), (
                f"{where} imports {name} through the package root"
            )


def test_importing_the_at_layer_loads_no_core_module() -> None:
    """In a fresh interpreter whose ``engm_opacus`` package body is skipped, ``engm_opacus.at`` loads no core module."""
    code = (
        "import importlib.util, sys, types\n"
        "spec = importlib.util.find_spec('engm_opacus')\n"
        "package = types.ModuleType('engm_opacus'); package.__path__ = list(spec.submodule_search_locations)\n"
        "sys.modules['engm_opacus'] = package\n"
        "import engm_opacus.at, engm_opacus.at.attacks, engm_opacus.at.losses, engm_opacus.at.step\n"
        "print(sorted(m for m in sys.modules if m.startswith('engm_opacus.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    loaded = ast.literal_eval(result.stdout.strip().splitlines()[-1])
    assert "engm_opacus.at.step" in loaded
    assert all(name.startswith("engm_opacus.at") for name in loaded), loaded
