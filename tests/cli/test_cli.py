"""``engm-opacus train`` / ``eval``: smoke runs, resume from the CLI, and clear errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engm_opacus.cli import COMMANDS, build_parser, main
from engm_opacus.cli.train import config_from_args

TINY = [
    "--max-train-examples", "32", "--batch-size", "16", "--pgd-steps", "2", "--width", "4",
    "--max-val-examples", "16", "--val-pgd-steps", "2", "--max-test-examples", "16", "--no-progress",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real ``python -m engm_opacus train --epochs 1`` run (the console-script entry point)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    completed = subprocess.run(
        [sys.executable, "-m", "engm_opacus", "train", "--epochs", "1", "--eps", "8/255", *TINY[:-1], "--out-dir", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr
    assert "clean acc" in completed.stdout and "PGD-20 acc" in completed.stdout and "eps 8/255" in completed.stdout
    return out


def test_train_smoke_writes_a_run(run_dir: Path) -> None:
    assert {"last.pt", "best.pt", "metrics.json", "metrics.csv", "result.json"} <= {p.name for p in run_dir.iterdir()}
    result = json.loads((run_dir / "result.json").read_text())
    assert result["config"]["optimizer"] == "engm" and result["config"]["epochs"] == 1
    assert 0.0 <= result["test_last"]["pgd_acc"] <= result["test_last"]["clean_acc"] <= 1.0


def test_eval_writes_json_and_table(run_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    output = tmp_path / "eval.json"
    assert main(["eval", str(run_dir / "best.pt"), "--no-autoattack", "--max-examples", "12", "--output", str(output)]) == 0
    results = json.loads(output.read_text())
    assert results["examples"] == 12 and results["pgd_steps"] == 20 and results["autoattack_acc"] is None
    assert results["eps"] == pytest.approx(8 / 255) and 0.0 <= results["pgd_acc"] <= results["clean_acc"]
    printed = capsys.readouterr().out
    assert "PGD-20 acc" in printed and "skipped" in printed and "8/255" in printed


def test_eval_with_autoattack_default_output(run_dir: Path) -> None:
    assert main(["eval", str(run_dir / "last.pt"), "--max-examples", "4", "--pgd-steps", "2"]) == 0
    results = json.loads((run_dir / "last.eval.json").read_text())
    assert results["autoattack_acc"] is not None and results["autoattack_acc"] <= results["clean_acc"]


def test_resume_takes_the_checkpoint_config(run_dir: Path) -> None:
    args = build_parser().parse_args(["train", "--resume", str(run_dir / "last.pt"), "--device", "cpu"])
    config = config_from_args(args)
    assert config.max_train_examples == 32 and config.width == 4 and config.epochs == 1
    assert config.device == "cpu" and config.resume == str(run_dir / "last.pt")
    fresh = config_from_args(build_parser().parse_args(["train", "--gamma", "0.5", "--optimizer", "msgd"]))
    assert fresh.gamma == 0.5 and fresh.optimizer == "msgd" and fresh.epochs == 10 and fresh.lr is None
    input_norm = config_from_args(build_parser().parse_args(["train", "--optimizer", "engm-input-norm"]))
    assert input_norm.optimizer == "engm-input-norm" and input_norm.validate().lr == 0.5


@pytest.mark.parametrize(
    "argv,names",
    [
        (["train", "--dataset", "mnist"], ["digits", "cifar10", "cifar100"]),
        (["train", "--model", "vgg"], ["small-cnn", "preact-resnet18", "wrn-34-10"]),
        (["train", "--at-method", "fgsm"], ["pgd-at", "trades", "mart", "awp-pgd-at", "awp-trades"]),
        (["train", "--optimizer", "engm-cheap"], ["engm", "engm-input-norm", "msgd"]),
        (["train", "--engm-mode", "ghost"], ["--engm-mode"]),
        (["train", "--eps", "abc"], ["8/255"]),
    ],
)
def test_unknown_names_exit_2_listing_the_choices(argv: list, names: list, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err.split("error:", 1)[1]
    assert info.value.code == 2 and all(f"'{name}'" in err or name in err for name in names)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--eps", "8"], "[0, 1]"),
        (["train", "--dataset", "cifar10", "--data-dir", "/nonexistent"], "cifar-10-batches-py"),
        (["eval", "/nonexistent/best.pt"], "does not exist"),
    ],
)
def test_bad_input_exits_2_with_the_fix(argv: list, message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main([*argv, *(["--out-dir", str(tmp_path / "run")] if argv[0] == "train" else [])]) == 2
    err = capsys.readouterr().err
    assert message in err and "Fix" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["train", "eval"])
def test_corrupt_checkpoint_exits_2_and_is_left_alone(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"PK\x03\x04 truncated zip")
    argv = ["train", "--resume", str(bad)] if command == "train" else ["eval", str(bad)]
    assert main(argv) == 2
    assert "unreadable" in capsys.readouterr().err
    assert bad.read_bytes() == b"PK\x03\x04 truncated zip" and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_every_registered_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    printed = capsys.readouterr().out
    for module in COMMANDS:
        assert module.rsplit(".", 1)[1] in printed
