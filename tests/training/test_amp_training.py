"""The training loop's ``amp`` (bf16 for every optimizer, fp16 resume with the scaler) and its single-process data-parallel helpers."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from engm_opacus import TrainConfig, train
from engm_opacus.training.config import check_resume_compatible
from engm_opacus.training.distributed import Distributed, per_rank_batch, rank_seed, setup
from engm_opacus.training.interrupts import resume_command

TINY = dict(
    max_train_examples=24, batch_size=8, pgd_steps=1, step_size=4 / 255, width=4,
    max_val_examples=8, val_pgd_steps=1, max_test_examples=8, test_pgd_steps=1, progress=False,
)


class Killed(Exception):
    """Stands in for the process dying right after epoch 1's checkpoint."""


def kill(record: dict) -> None:
    raise Killed


@pytest.mark.parametrize("optimizer", ["msgd", "engm", "engm-input-norm"])
def test_bf16_trains_every_optimizer(tmp_path: Path, optimizer: str) -> None:
    result = train(TrainConfig(epochs=1, optimizer=optimizer, amp="bf16", norm="batch", out_dir=str(tmp_path), **TINY))
    record = result.history[0]
    assert math.isfinite(record["train_loss"]) and "amp_skipped_steps" not in record
    assert result.config.amp == "bf16" and result.world_size == 1


def test_fp16_resume_restores_the_grad_scaler_bit_identically(tmp_path: Path) -> None:
    config = dict(epochs=2, amp="fp16", norm="batch", **TINY)
    straight = train(TrainConfig(out_dir=str(tmp_path / "straight"), **config))
    with pytest.raises(Killed):
        train(TrainConfig(out_dir=str(tmp_path / "resumed"), **config), on_epoch_end=kill)
    checkpoint = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert checkpoint["scaler"]["scale"] == checkpoint["history"][0]["amp_scale"] < 2.0**16, "an overflow backed the scale off"
    assert checkpoint["history"][0]["amp_skipped_steps"] >= 1
    resumed = train(TrainConfig(resume=str(tmp_path / "resumed" / "last.pt"), **config))
    for ours, theirs in zip(resumed.history, straight.history):
        timeless = {k: v for k, v in ours.items() if not k.endswith("time_s")}
        assert timeless == {k: v for k, v in theirs.items() if not k.endswith("time_s")}
    a, b = (torch.load(tmp_path / name / "last.pt", weights_only=True) for name in ("straight", "resumed"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["scaler"] == b["scaler"]


def test_a_checkpoint_from_before_amp_resumes_with_amp_off() -> None:
    saved = asdict(TrainConfig().validate())
    del saved["amp"]
    check_resume_compatible(TrainConfig().validate(), saved, "old.pt")
    with pytest.raises(ValueError, match="amp: checkpoint 'off', now 'bf16'"):
        check_resume_compatible(TrainConfig(amp="bf16").validate(), saved, "old.pt")


def test_unknown_amp_names_the_choices() -> None:
    with pytest.raises(ValueError, match="Unknown amp 'fp8'.*off, bf16, fp16"):
        TrainConfig(amp="fp8").validate()


def test_without_torchrun_nothing_is_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert setup("cpu") == (Distributed(), torch.device("cpu"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert setup("cpu")[0] == Distributed()


def test_the_global_batch_splits_evenly_over_the_processes() -> None:
    assert per_rank_batch(128, 4) == 32 and per_rank_batch(7, 1) == 7
    with pytest.raises(ValueError, match="--batch-size 30 is the global batch.*4 processes.*multiple of 4 \\(e.g. 28\\)"):
        per_rank_batch(30, 4)
    assert rank_seed(5, 0) == 5 and len({rank_seed(5, r) for r in range(8)}) == 8


def test_the_resume_command_of_a_torchrun_job() -> None:
    command = resume_command(Path("runs/x/last.pt"), Path("runs/x"), nproc=4)
    assert command == "torchrun --nproc_per_node 4 -m engm_opacus train --resume runs/x/last.pt"
    assert resume_command(Path("runs/x/last.pt"), Path("runs/x")) == "engm-opacus train --resume runs/x/last.pt"
