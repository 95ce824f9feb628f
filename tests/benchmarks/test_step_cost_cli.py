"""benchmarks/step_cost.py: unknown names are refused with the known ones listed; a tiny run fills the table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "step_cost.py"


def load_step_cost():
    """The benchmark script as a module (it is not part of the installed package)."""
    name = "_step_cost_script"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--methods", "msgd,engm,ghost", "unknown methods 'ghost'; known methods: msgd, engm, engm-input-norm, engm-input-norm-calibration, engm-input-norm-backward, opacus-ghost, backpack, functorch"),
        ("--models", "preact18-gn,small-cnn", "unknown models 'small-cnn'; known models: preact18-bn, preact18-gn"),
    ],
)
def test_unknown_names_are_refused_with_the_known_ones(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_step_cost().main([flag, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_tiny_run_times_and_measures_msgd_and_engm_on_groupnorm(tmp_path, capsys):
    output = tmp_path / "step_cost.json"
    argv = ["--methods", "msgd,engm", "--models", "preact18-gn", "--width", "4", "--batch", "4"]
    argv += ["--repeats", "1", "--threads", "1", "--output", str(output)]
    payload = load_step_cost().main(argv)
    printed = capsys.readouterr().out
    assert "ENGM (exact)" in printed and "MSGD" in printed
    assert output.exists()
    rows = {r["method"]: r for r in payload["rows"]}
    assert set(rows) == {"msgd", "engm"}
    for row in rows.values():
        assert row["model"] == "preact18-gn"
        assert row["median_s"] > 0 and row["peak_bytes"] > 0, row["note"]
        assert not row["note"].startswith(("error", "n/a")), row["note"]
    assert rows["msgd"]["time_ratio"] == 1.0 and rows["msgd"]["memory_ratio"] == 1.0


def test_input_norm_rows_and_their_amortized_ratio(capsys):
    argv = ["--methods", "engm-input-norm,engm-input-norm-calibration,engm-input-norm-backward", "--models", "preact18-bn"]
    argv += ["--width", "4", "--batch", "4", "--repeats", "1", "--threads", "1", "--no-memory"]
    payload = load_step_cost().main(argv)
    ratio = {r["method"]: r["time_ratio"] for r in payload["rows"]}
    expected = (ratio["engm-input-norm-calibration"] + 9 * ratio["engm-input-norm"]) / 10
    assert payload["amortized"] == [
        f"PreAct ResNet-18, BatchNorm: ENGM (input-norm) amortized over calibrate_every=10: {expected:.3f}x MSGD "
        f"(step {ratio['engm-input-norm']:.3f}x, calibration step {ratio['engm-input-norm-calibration']:.3f}x)"
    ]
    assert payload["amortized"][0] in capsys.readouterr().out
