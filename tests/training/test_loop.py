"""The training loop: robust accuracy on digits, bit-identical resume, logs and checkpoints, bad configs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engm_opacus import TrainConfig, train
from engm_opacus.training.checkpoints import CheckpointError, load_checkpoint, load_trained_model
from engm_opacus.training.interrupts import TrainingInterrupted, resume_command
from engm_opacus.training.loop import lr_factor

TINY = dict(
    max_train_examples=48, batch_size=16, pgd_steps=2, step_size=4 / 255, width=4,
    max_val_examples=16, val_pgd_steps=2, max_test_examples=16, test_pgd_steps=2, progress=False,
)


class Killed(Exception):
    """Stands in for the process dying right after an epoch's checkpoint was written."""


def kill_after(epoch: int):
    def callback(record: dict) -> None:
        if record["epoch"] == epoch:
            raise Killed

    return callback


def folder_snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_short_engm_run_is_robust_above_chance(tmp_path: Path) -> None:
    """ENGM + PGD-AT, 3 epochs on 512 digits: measured test PGD-10 accuracy 0.77 (clean 0.89); chance is 0.1."""
    config = TrainConfig(
        epochs=3, max_train_examples=512, batch_size=32, pgd_steps=3, step_size=3 / 255, width=8,
        max_val_examples=64, val_pgd_steps=3, max_test_examples=180, test_pgd_steps=10,
        seed=0, out_dir=str(tmp_path / "run"), progress=False,
    )
    result = train(config)
    assert result.config.optimizer == "engm" and result.config.lr == 0.5
    assert result.test_last["pgd_acc"] >= 0.5
    assert result.test_last["clean_acc"] >= result.test_last["pgd_acc"]
    history = result.history
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert 0.0 < history[-1]["engm_mean_fraction_above_gamma"] <= 1.0
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_resume_after_a_kill_is_bit_identical(tmp_path: Path) -> None:
    """3 epochs straight == 1 epoch, killed, resumed for 2 more: equal weights, momentum, scheduler and history."""
    straight = train(TrainConfig(epochs=3, out_dir=str(tmp_path / "straight"), **TINY))
    interrupted = TrainConfig(epochs=3, out_dir=str(tmp_path / "resumed"), **TINY)
    with pytest.raises(Killed):
        train(interrupted, on_epoch_end=kill_after(1))
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 1
    resumed = train(replace(interrupted, resume=str(tmp_path / "resumed" / "last.pt")))

    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert a["epoch"] == b["epoch"] == 3
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    momentum_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    momentum_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert len(momentum_a) == len(a["model"]) and all(torch.equal(x, y) for x, y in zip(momentum_a, momentum_b))
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 3 * 3
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]) and torch.equal(a["rng"]["loader"], b["rng"]["loader"])
    timeless = lambda history: [{k: v for k, v in r.items() if "time" not in k} for r in history]  # noqa: E731
    assert timeless(straight.history) == timeless(resumed.history)
    assert straight.test_last == resumed.test_last


def test_logs_checkpoints_and_result(tmp_path: Path) -> None:
    result = train(TrainConfig(epochs=2, schedule="cosine", out_dir=str(tmp_path), **TINY))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics] == [1, 2]
    expected = {"lr", "train_loss", "train_clean_acc", "train_robust_acc", "val_clean_acc", "val_pgd_acc", "time_s",
                "engm_mean_fraction_above_gamma", "engm_mean_median_norm", "engm_mean_direction_norm"}
    assert expected <= metrics[0].keys()
    csv_lines = (tmp_path / "metrics.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].split(",")[0] == "epoch"
    best = load_checkpoint(tmp_path / "best.pt")
    val = [r["val_pgd_acc"] for r in metrics]
    assert best["epoch"] == result.best_epoch == 1 + val.index(max(val))
    assert result.robust_overfitting_gap == pytest.approx(max(val) - val[-1])
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["best_epoch"] == result.best_epoch and saved["test_last"] == result.test_last
    assert {"clean_acc", "pgd_acc"} <= result.test_best.keys()


def test_msgd_baseline_uses_plain_sgd_and_threads_are_restored(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    result = train(TrainConfig(epochs=1, optimizer="msgd", threads=1, out_dir=str(tmp_path), **TINY))
    assert torch.get_num_threads() == threads
    assert result.config.lr == 0.1
    assert not any(key.startswith("engm_") for key in result.history[0])


def test_input_norm_variant_on_a_batchnorm_model_logs_its_calibration(tmp_path: Path) -> None:
    """``--optimizer engm-input-norm`` with BatchNorm; the checkpoint's plain keys load into the plain model."""
    config = TrainConfig(
        epochs=1, optimizer="engm-input-norm", norm="batch", engm_options={"calibrate_every": 2}, out_dir=str(tmp_path), **TINY
    )
    result = train(config)
    record = result.history[0]
    assert result.config.lr == 0.5 and record["engm_skipped_steps"] == 0
    assert record["engm_scale"] > 0 and record["engm_mean_calibration_error"] >= 0
    assert 0.0 <= record["engm_mean_fraction_above_gamma"] <= 1.0
    saved = load_checkpoint(tmp_path / "last.pt")
    assert not any(key.startswith("_module.") for key in saved["model"])
    model, loaded_config, _ = load_trained_model(tmp_path / "last.pt")
    assert loaded_config.optimizer == "engm-input-norm" and any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved["model"][key]), key


def test_bad_resume_file_raises_and_overwrites_nothing(tmp_path: Path) -> None:
    train(TrainConfig(epochs=1, out_dir=str(tmp_path), **TINY))
    last = tmp_path / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    before = folder_snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="unreadable"):
        train(TrainConfig(epochs=1, out_dir=str(tmp_path), resume=str(last), **TINY))
    assert folder_snapshot(tmp_path) == before


def test_existing_run_is_not_overwritten_and_resume_config_must_match(tmp_path: Path) -> None:
    config = TrainConfig(epochs=1, out_dir=str(tmp_path), **TINY)
    train(config)
    before = folder_snapshot(tmp_path)
    with pytest.raises(FileExistsError, match="resume"):
        train(config)
    with pytest.raises(ValueError, match="gamma: checkpoint 1.0, now 2.0"):
        train(replace(config, gamma=2.0, resume=str(tmp_path / "last.pt")))
    assert folder_snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("dataset", "mnist", "digits, cifar10, cifar100"),
        ("model", "vgg", "small-cnn, preact-resnet18, wrn-34-10"),
        ("at_method", "fgsm", "pgd-at, trades, mart"),
        ("optimizer", "adam", "engm, engm-input-norm, msgd"),
        ("schedule", "step", "piecewise, cosine"),
        ("eps", 8.0, "\\[0, 1\\]"),
        ("eps", -0.1, "\\[0, 1\\]"),
        ("gamma", 0.0, "gamma"),
        ("epochs", 0, "positive int"),
        ("lr", -1.0, "lr"),
    ],
)
def test_bad_config_values_name_the_fix(tmp_path: Path, field: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        train(replace(TrainConfig(out_dir=str(tmp_path), **TINY), **{field: value}))
    assert list(tmp_path.iterdir()) == []


def test_missing_cifar_files_fail_before_writing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        train(TrainConfig(dataset="cifar10", data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "run"), **TINY))
    assert not (tmp_path / "run").exists()


def test_schedules() -> None:
    piecewise = lr_factor("piecewise", epochs=200, steps_per_epoch=10)
    assert [piecewise(t) for t in (0, 999, 1000, 1499, 1500, 1999)] == [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    cosine = lr_factor("cosine", epochs=4, steps_per_epoch=5)
    assert cosine(0) == 1.0 and cosine(10) == pytest.approx(0.5) and cosine(20) == pytest.approx(0.0)


def test_ctrl_c_names_the_last_checkpoint_and_the_resume_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def interrupt(record: dict) -> None:
        raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted) as info:
        train(TrainConfig(epochs=2, out_dir=str(tmp_path), **TINY), on_epoch_end=interrupt)
    error = info.value
    assert isinstance(error, KeyboardInterrupt) and error.checkpoint == tmp_path / "last.pt" and error.epoch == 1
    assert error.command == f"engm-opacus train --resume {tmp_path / 'last.pt'}" and error.command in str(error)
    assert capsys.readouterr().out == ""  # progress=False and no print_results: silent
    moved = tmp_path / "elsewhere"
    assert resume_command(tmp_path / "last.pt", moved).endswith(f"--out-dir {moved}")
