"""Checkpoints: round trip, clear errors on bad files, atomic replace under failure and hard kill, RNG state."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engm_opacus.training import checkpoints, logs
from engm_opacus.training.checkpoints import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    load_trained_model,
    restore_rng_state,
    save_checkpoint,
)
from engm_opacus.training.config import TrainConfig
from engm_opacus.training.logs import atomic_write_text, write_csv, write_json
from engm_opacus.training.models import build_model


def state(value: float) -> dict:
    return {"epoch": 1, "model": {"w": torch.full((64, 64), value)}, "config": {"seed": 0}}


def assert_holds(path: Path, value: float) -> None:
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], torch.full((64, 64), value))


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_round_trip_and_format_stamp(tmp_path: Path) -> None:
    path = save_checkpoint(state(1.0), tmp_path / "run" / "last.pt")
    loaded = load_checkpoint(path)
    assert loaded["format"] == checkpoints.FORMAT and loaded["version"] == checkpoints.VERSION
    assert loaded["epoch"] == 1 and loaded["config"] == {"seed": 0}
    assert_holds(path, 1.0)
    assert temp_files(path.parent) == []
    assert (path.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@pytest.mark.parametrize(
    "kind,match",
    [
        ("missing", "does not exist"),
        ("truncated", "unreadable"),
        ("garbage", "unreadable"),
        ("empty", "unreadable"),
        ("foreign", "not an engm-opacus checkpoint"),
        ("old-version", "version 0"),
        ("incomplete", "lacks model"),
    ],
)
def test_bad_files_raise_clear_errors_and_stay_untouched(tmp_path: Path, kind: str, match: str) -> None:
    good = save_checkpoint(state(1.0), tmp_path / "good.pt")
    path = tmp_path / "bad.pt"
    if kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "garbage":
        path.write_bytes(os.urandom(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "foreign":
        torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    elif kind == "old-version":
        torch.save({**state(1.0), "format": checkpoints.FORMAT, "version": 0}, path)
    elif kind == "incomplete":
        torch.save({"format": checkpoints.FORMAT, "version": checkpoints.VERSION, "epoch": 1, "config": {}}, path)
    before = path.read_bytes() if path.exists() else None
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(path)
    assert "Fix" in str(info.value) and str(path) in str(info.value)
    assert (path.read_bytes() if path.exists() else None) == before


def test_failure_during_write_keeps_the_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash after part of the new file is written: the old checkpoint is intact, no temp file is left."""
    path = save_checkpoint(state(1.0), tmp_path / "last.pt")
    old_bytes = path.read_bytes()

    def crash_midway(payload: object, handle) -> None:
        handle.write(old_bytes[: len(old_bytes) // 3])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(checkpoints.torch, "save", crash_midway)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(state(2.0), path)
    monkeypatch.undo()
    assert path.read_bytes() == old_bytes
    assert_holds(path, 1.0)
    assert temp_files(tmp_path) == []


def test_hard_kill_during_write_keeps_the_old_checkpoint(tmp_path: Path) -> None:
    """SIGKILL while the new file is being written: the old checkpoint is still the same, loadable file.

    The writer is a forked child (no re-import of torch); it writes the first half of a new
    checkpoint through ``logs.atomic_write``, reports, and waits to be killed.
    """
    path = save_checkpoint(state(1.0), tmp_path / "last.pt")
    old_bytes = path.read_bytes()
    new_bytes = save_checkpoint(state(2.0), tmp_path / "new.pt").read_bytes()
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            os.close(ready_read)

            def write_half_then_hang(handle) -> None:
                handle.write(new_bytes[: len(new_bytes) // 2])
                handle.flush()
                os.write(ready_write, b"1")
                time.sleep(60)

            logs.atomic_write(path, write_half_then_hang)
        finally:
            os._exit(1)
    os.close(ready_write)
    try:
        assert os.read(ready_read, 1) == b"1"
        assert len(temp_files(tmp_path)) == 1  # the new bytes went to a temp file, not to last.pt
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_read)
    assert path.read_bytes() == old_bytes
    assert_holds(path, 1.0)


def test_atomic_text_replaces_whole_file(tmp_path: Path) -> None:
    path = atomic_write_text("first\n", tmp_path / "log.json")
    atomic_write_text("second\n", path)
    assert path.read_text() == "second\n" and temp_files(tmp_path) == []


def test_rng_states_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(5)
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in NumPy's state
    save_checkpoint({**state(0.0), "rng": capture_rng_state(generator)}, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.standard_normal(3), random.random(), torch.randperm(10, generator=generator))
    torch.manual_seed(9), np.random.seed(9), random.seed(9), generator.manual_seed(9)
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"], generator)
    actual = (torch.rand(3), np.random.standard_normal(3), random.random(), torch.randperm(10, generator=generator))
    assert torch.equal(expected[0], actual[0]) and np.array_equal(expected[1], actual[1])
    assert expected[2] == actual[2] and torch.equal(expected[3], actual[3])


def test_csv_and_json_writers_are_atomic_and_blank_non_finite_values(tmp_path: Path) -> None:
    rows = [{"a": 1, "b": float("nan")}, {"a": 2.5, "c": "x"}]
    path = write_csv(rows, tmp_path / "t.csv")
    assert path.read_text().splitlines() == ["a,b,c", "1,,", "2.5,,x"]
    assert write_csv(rows, tmp_path / "u.csv", columns=("c", "a")).read_text().splitlines() == ["c,a", ",1", "x,2.5"]
    assert write_json({"k": [1, 2]}, tmp_path / "r.json").read_text() == '{\n  "k": [\n    1,\n    2\n  ]\n}\n'
    assert temp_files(tmp_path) == []


def test_trained_model_is_rebuilt_from_the_checkpoint_config_and_refuses_foreign_weights(tmp_path: Path) -> None:
    config = TrainConfig(width=4)
    model = build_model("small-cnn", num_classes=10, in_channels=1, norm="group", width=4)
    path = save_checkpoint({"epoch": 1, "model": model.state_dict(), "config": vars(config)}, tmp_path / "last.pt")
    loaded, loaded_config, payload = load_trained_model(path)
    assert loaded_config.width == 4 and payload["epoch"] == 1 and not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    wider = build_model("small-cnn", num_classes=10, in_channels=1, norm="group", width=8)
    bad = save_checkpoint({"epoch": 1, "model": wider.state_dict(), "config": vars(config)}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="do not fit.*Fix"):
        load_trained_model(bad)
