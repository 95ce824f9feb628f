"""The optional extras ([eval]: pyautoattack, [plots]: matplotlib): imported on use, or an error naming the pip command."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from engm_opacus.experiments.benchmark_report import plot_sweeps
from engm_opacus.experiments.diagnostics_report import plot_all
from engm_opacus.training.extras import EXTRAS, MissingExtraError, install_hint, require


@pytest.mark.parametrize("module, extra", [("pyautoattack", "eval"), ("matplotlib.figure", "plots")])
def test_missing_extra_names_the_pip_command(monkeypatch: pytest.MonkeyPatch, module: str, extra: str) -> None:
    monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setitem(sys.modules, module.split(".")[0], None)  # as if not installed
    with pytest.raises(MissingExtraError, match=rf"Plotting needs the optional package '{module.split('.')[0]}'.*pip install 'engm-opacus\[{extra}\]'") as info:
        require(module, "Plotting")
    assert isinstance(info.value, ImportError) and info.value.name == module.split(".")[0]
    assert install_hint(module) == f"pip install 'engm-opacus[{extra}]'"


def test_an_installed_extra_is_returned_and_every_extra_is_declared_in_pyproject() -> None:
    """Each extra named by an error installs its module, and ``[dev]`` (tests + docs, one environment) includes them."""
    tomllib = pytest.importorskip("tomllib")
    assert require("matplotlib.figure", "Plotting").Figure is not None
    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    for module, extra in EXTRAS.items():
        assert any(requirement.startswith(module) for requirement in extras[extra]), (module, extra)
        assert not any(requirement.startswith(module) for requirement in project["dependencies"]), module
    assert "engm-opacus[eval,plots,docs]" in extras["dev"]


def test_an_import_error_inside_an_installed_package_is_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken dependency of matplotlib itself is re-raised as is, not blamed on a missing extra."""
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib", __import__("matplotlib"))
    monkeypatch.setattr("importlib.import_module", lambda name: (_ for _ in ()).throw(ImportError("no kiwisolver", name="kiwisolver")))
    with pytest.raises(ImportError, match="no kiwisolver") as info:
        require("matplotlib.figure", "Plotting")
    assert not isinstance(info.value, MissingExtraError)


def test_plots_without_matplotlib_name_the_plots_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.delitem(sys.modules, "matplotlib.figure", raising=False)
    summary = [{"part": "sensitivity-lr", "optimizer": "msgd", "factor": 1.0, "pgd20_last_mean": 0.5, "pgd20_last_std": 0.0}]
    with pytest.raises(MissingExtraError, match=r"benchmark's plots.*engm-opacus\[plots\]"):
        plot_sweeps(summary, tmp_path / "sweeps.png")
    with pytest.raises(MissingExtraError, match=r"diagnostics plots.*engm-opacus\[plots\]"):
        plot_all(tmp_path, None, None)  # type: ignore[arg-type] - fails before reading them
    assert not any(tmp_path.iterdir())


def test_sweep_plot_is_written_with_matplotlib(tmp_path: Path) -> None:
    summary = [
        {"part": "sensitivity-lr", "optimizer": opt, "factor": f, "pgd20_last_mean": 0.3 + 0.1 * f, "pgd20_last_std": 0.01}
        for opt in ("msgd", "engm") for f in (0.5, 1.0, 2.0)
    ]
    assert plot_sweeps(summary, tmp_path / "sweeps.png")
    assert (tmp_path / "sweeps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
