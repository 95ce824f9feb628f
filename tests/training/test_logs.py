"""Eval results merged atomically (earlier AutoAttack numbers kept with their settings); write errors name path and errno."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from engm_opacus.training import logs
from engm_opacus.training.logs import OutputError, claim_new_dir, merge_eval_results, write_json


def results(**overrides: object) -> dict:
    base = {
        "checkpoint": "runs/x/best.pt", "checkpoint_sha256": "abc", "epoch": 7, "dataset": "digits", "model": "small-cnn",
        "optimizer": "engm", "at_method": "pgd-at", "examples": 16, "eps": 8 / 255, "step_size": 2 / 255, "pgd_steps": 20,
        "clean_acc": 0.9, "pgd_acc": 0.8, "autoattack_acc": None,
    }
    return {**base, **overrides}


def with_autoattack() -> dict:
    return results(autoattack_acc=0.75, autoattack_version="standard", autoattack_seed=0, examples=1000)


def test_a_later_run_without_autoattack_keeps_the_number_and_its_settings(tmp_path: Path) -> None:
    path = tmp_path / "best.eval.json"
    first = merge_eval_results(path, with_autoattack())
    settings = {"examples": 1000, "eps": 8 / 255, "autoattack_version": "standard", "autoattack_seed": 0}
    assert first["measured_with"]["autoattack_acc"] == settings
    merged = merge_eval_results(path, results(examples=12, pgd_steps=50, pgd_acc=0.7, autoattack_version="rand"))
    assert merged == json.loads(path.read_text())
    assert merged["autoattack_acc"] == 0.75 and merged["autoattack_version"] == "standard" and merged["autoattack_seed"] == 0
    assert merged["measured_with"]["autoattack_acc"]["examples"] == 1000
    assert merged["examples"] == 12 and merged["pgd_acc"] == 0.7 and merged["measured_with"]["pgd_acc"]["pgd_steps"] == 50
    again = merge_eval_results(path, results(examples=5))
    assert again["autoattack_acc"] == 0.75 and again["measured_with"]["autoattack_acc"]["examples"] == 1000
    newer = merge_eval_results(path, results(autoattack_acc=0.6, autoattack_version="standard", examples=20))
    assert newer["autoattack_acc"] == 0.6 and newer["measured_with"]["autoattack_acc"]["examples"] == 20


@pytest.mark.parametrize("changed", [{"epoch": 8}, {"checkpoint_sha256": "def"}, {"model": "preact-resnet18"}])
def test_numbers_of_another_model_are_not_kept(changed: dict, tmp_path: Path) -> None:
    path = tmp_path / "last.eval.json"
    merge_eval_results(path, with_autoattack())
    merged = merge_eval_results(path, results(**changed))
    assert merged["autoattack_acc"] is None and "autoattack_acc" not in merged["measured_with"]


def test_failed_write_keeps_the_earlier_file_and_names_path_and_errno(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "best.eval.json"
    merge_eval_results(path, with_autoattack())
    before = path.read_bytes()

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(logs.os, "fsync", full_disk)
    with pytest.raises(OutputError) as info:
        merge_eval_results(path, results())
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert str(info.value) == f"cannot write {path}: No space left on device (ENOSPC, errno 28); the previous file is intact"
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["best.eval.json"]


def test_an_unreadable_earlier_file_is_moved_aside_not_lost(tmp_path: Path) -> None:
    path = tmp_path / "best.eval.json"
    path.write_text("{truncated")
    with pytest.warns(UserWarning, match="moved it to"):
        merged = merge_eval_results(path, with_autoattack())
    assert (tmp_path / "best.eval.json.unreadable").read_text() == "{truncated"
    assert json.loads(path.read_text()) == merged


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_write_errors_become_output_errors(code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(logs.tempfile, "mkstemp", refuse)
    with pytest.raises(OutputError, match=errno.errorcode[code]):
        write_json({}, tmp_path / "r.json")
    monkeypatch.setattr(logs.Path, "mkdir", refuse)
    with pytest.raises(OutputError, match=f"cannot write {tmp_path / 'runs' / 'a'}.*{errno.errorcode[code]}"):
        claim_new_dir(tmp_path / "runs" / "a")
