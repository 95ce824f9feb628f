"""Nothing lost: distinct default run folders, tables before writes, one-line write errors, Ctrl-C with the resume command."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import torch

from engm_opacus.cli import main
from engm_opacus.training import checkpoints, logs, loop
from engm_opacus.training.checkpoints import load_checkpoint
from engm_opacus.training.logs import claim_new_dir

TINY = [
    "--max-train-examples", "32", "--batch-size", "16", "--pgd-steps", "2", "--width", "4",
    "--max-val-examples", "16", "--val-pgd-steps", "2", "--max-test-examples", "16", "--test-pgd-steps", "2", "--no-progress",
]
STEPS_PER_EPOCH = 2

INTERRUPTIBLE = """
import sys, time
import engm_opacus.training.loop as loop
from engm_opacus.cli import main

real_step, calls = loop.train_step, [0]

def step_then_wait_in_epoch_2(*args, **kwargs):
    calls[0] += 1
    if calls[0] == {steps} + 1:  # first step of epoch 2: epoch 1's checkpoint is written
        print("READY", flush=True)
        time.sleep(120)
    return real_step(*args, **kwargs)

loop.train_step = step_then_wait_in_epoch_2
sys.exit(main(sys.argv[1:]))
""".format(steps=STEPS_PER_EPOCH)


def _claim(base: str, barrier, queue) -> None:
    barrier.wait()
    queue.put(str(claim_new_dir(base)))


def test_concurrent_claims_of_one_name_get_distinct_folders(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    barrier, queue = context.Barrier(4), context.Queue()
    workers = [context.Process(target=_claim, args=(str(tmp_path / "runs" / "same-second"), barrier, queue)) for _ in range(4)]
    for worker in workers:
        worker.start()
    claimed = sorted(queue.get(timeout=60) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
    assert len(set(claimed)) == 4 and all(Path(p).is_dir() for p in claimed)
    assert sorted(Path(p).name for p in claimed) == ["same-second", "same-second-2", "same-second-3", "same-second-4"]


def test_two_default_runs_in_the_same_second_keep_both_results_and_print_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loop, "default_out_dir", lambda config: Path("runs") / "20240101-000000-digits-engm-pgd-at")
    for _ in range(2):
        assert main(["train", "--epochs", "1", *TINY]) == 0
        printed = capsys.readouterr().out
        assert "clean acc" in printed and "PGD-2 acc" in printed and "Epochs" in printed  # --no-progress keeps the tables
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["20240101-000000-digits-engm-pgd-at", "20240101-000000-digits-engm-pgd-at-2"]
    assert all((tmp_path / "runs" / name / "result.json").is_file() for name in runs)


def fail_on(monkeypatch: pytest.MonkeyPatch, name: str, occurrence: int, code: int) -> None:
    """Make the ``occurrence``-th atomic write of a file called ``name`` fail with ``OSError(code)`` after half the bytes."""
    real_write, seen = logs.atomic_write, [0]

    def write(path, produce):
        if Path(path).name == name:
            seen[0] += 1
            if seen[0] == occurrence:
                def half_then_fail(handle):
                    handle.write(b"partial")
                    raise OSError(code, os.strerror(code))
                return real_write(path, half_then_fail)
        return real_write(path, produce)

    monkeypatch.setattr(logs, "atomic_write", write)
    monkeypatch.setattr(checkpoints, "atomic_write", write)


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fail_on(monkeypatch, "last.pt", occurrence=2, code=errno.ENOSPC)
    run = tmp_path / "run"
    assert main(["train", "--epochs", "2", *TINY, "--out-dir", str(run)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert str(run / "last.pt") in line and "ENOSPC" in line and "errno 28" in line
    assert f"engm-opacus train --resume {run / 'last.pt'}" in line
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


def test_read_only_result_write_prints_the_tables_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fail_on(monkeypatch, "result.json", occurrence=1, code=errno.EROFS)
    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", *TINY, "--out-dir", str(run)]) == 1
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert str(run / "result.json") in line and "EROFS" in line
    assert "clean acc" in captured.out and "PGD-2 acc" in captured.out
    assert not (run / "result.json").exists() and load_checkpoint(run / "last.pt")["epoch"] == 1


def test_unwritable_runs_folder_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    real_mkdir = os.mkdir

    def refuse(path, *args, **kwargs):
        if "runs" in str(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refuse)
    assert main(["train", "--epochs", "1", *TINY]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "cannot write runs" in line and "EACCES" in line and "errno 13" in line


def cli(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engm_opacus", *argv], capture_output=True, text=True, timeout=600, **kwargs)


def without_times(history: List[dict]) -> List[dict]:
    return [{k: v for k, v in record.items() if "time" not in k} for record in history]


def test_ctrl_c_prints_the_resume_command_and_the_resumed_run_is_bit_identical(tmp_path: Path) -> None:
    """A subprocess run gets SIGINT in epoch 2 (after epoch 1's checkpoint); its resume command finishes it identically."""
    common = ["train", "--epochs", "3", "--seed", "3", *TINY]
    interrupted = tmp_path / "interrupted"
    child = subprocess.Popen(
        [sys.executable, "-c", INTERRUPTIBLE, *common, "--out-dir", str(interrupted)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout.readline().strip() == "READY"
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 130
    line = one_error_line(err)
    assert line.startswith("engm-opacus train: interrupted: last checkpoint") and "(epoch 1)" in line
    command = line.split("resume with: ", 1)[1]
    assert command == f"engm-opacus train --resume {shlex.quote(str(interrupted / 'last.pt'))}"

    resumed = cli(*shlex.split(command)[1:])
    assert resumed.returncode == 0, resumed.stderr
    straight = tmp_path / "straight"
    assert cli(*common, "--out-dir", str(straight)).returncode == 0

    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(interrupted / "last.pt")
    assert a["epoch"] == b["epoch"] == 3 and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"] and torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert without_times(a["history"]) == without_times(b["history"])
    result_a, result_b = (json.loads((folder / "result.json").read_text()) for folder in (straight, interrupted))
    assert result_a["test_last"] == result_b["test_last"] and result_a["test_best"] == result_b["test_best"]
