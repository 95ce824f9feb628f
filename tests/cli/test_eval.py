"""``engm-opacus eval``: AutoAttack versions through pyautoattack, the table before the write, a kept AutoAttack number, the [eval] extra."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from engm_opacus.cli import build_parser, main

TINY = [
    "--max-train-examples", "32", "--batch-size", "16", "--pgd-steps", "2", "--width", "4",
    "--max-val-examples", "16", "--val-pgd-steps", "2", "--max-test-examples", "16", "--no-progress",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "run"
    assert main(["train", "--epochs", "1", *TINY, "--out-dir", str(out)]) == 0
    return out / "last.pt"


def test_standard_autoattack_settings_are_recorded_and_kept_by_a_later_run_without_it(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("pyautoattack")
    output = tmp_path / "eval.json"
    assert main(["eval", str(checkpoint), "--max-examples", "4", "--pgd-steps", "2", "--eps", "0.5", "--output", str(output)]) == 0
    first = json.loads(output.read_text())
    assert first["autoattack_acc"] is not None and first["autoattack_package"].startswith("pyautoattack ")
    assert first["autoattack_version"] == "standard" and first["autoattack_attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert first["autoattack_apgd_iterations"] == first["autoattack_apgd_t_iterations"] == first["autoattack_fab_iterations"] == 100
    assert first["autoattack_norm"] == "Linf" and first["autoattack_square_queries"] == 5000 and first["eps"] == 0.5
    assert "AutoAttack (standard) acc" in capsys.readouterr().out

    assert main(["eval", str(checkpoint), "--no-autoattack", "--max-examples", "6", "--pgd-steps", "1", "--output", str(output)]) == 0
    second = json.loads(output.read_text())
    assert second["examples"] == 6 and second["pgd_steps"] == 1
    assert second["autoattack_acc"] == first["autoattack_acc"] and second["autoattack_version"] == "standard"
    assert second["measured_with"]["autoattack_acc"]["examples"] == 4 and second["measured_with"]["autoattack_acc"]["eps"] == 0.5
    printed = capsys.readouterr().out
    assert "skipped" in printed and "Kept the earlier AutoAttack accuracy" in printed


def test_custom_version_runs_the_attacks_given(checkpoint: Path, tmp_path: Path) -> None:
    pytest.importorskip("pyautoattack")
    output = tmp_path / "custom.json"
    argv = ["eval", str(checkpoint), "--max-examples", "4", "--pgd-steps", "1", "--eps", "0.5", "--output", str(output)]
    assert main([*argv, "--autoattack-version", "custom", "--attacks", "apgd-ce", "square"]) == 0
    results = json.loads(output.read_text())
    assert results["autoattack_version"] == "custom" and results["autoattack_attacks"] == ["apgd-ce", "square"]


def test_attacks_without_the_custom_version_is_refused(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(checkpoint), "--attacks", "apgd-ce"]) == 2
    assert "--autoattack-version custom" in capsys.readouterr().err


def test_versions_and_attacks_are_choices_in_help() -> None:
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "x.pt", "--autoattack-version", "strong"])
    args = parser.parse_args(["eval", "x.pt"])
    assert args.autoattack and args.autoattack_version == "standard" and args.attacks is None
    eval_help = parser._subparsers._group_actions[0].choices["eval"].format_help()  # noqa: SLF001 - argparse has no public accessor
    assert "{standard,plus,rand,custom}" in eval_help and "apgd-ce, apgd-dlr, apgd-t, fab, fab-t, square" in eval_help


def test_autoattack_without_the_eval_extra_is_one_line_naming_the_pip_command(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # as if not installed
    output = tmp_path / "none.json"
    assert main(["eval", str(checkpoint), "--max-examples", "2", "--output", str(output)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'engm-opacus[eval]'" in err and "--no-autoattack" in err
    assert not output.exists()
    assert main(["eval", str(checkpoint), "--no-autoattack", "--max-examples", "2", "--pgd-steps", "1", "--output", str(output)]) == 0
    assert json.loads(output.read_text())["autoattack_acc"] is None
