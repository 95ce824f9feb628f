"""``engm-opacus train`` under ``torchrun --nproc_per_node 2`` (gloo, CPU): one run folder, per-rank resume, fp16 scaler, replicas."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")

pytestmark = pytest.mark.skipif(TORCHRUN is None or not torch.distributed.is_available(), reason="needs torchrun (torch.distributed)")


def torchrun(args: list, cwd: Path) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 ARGS`` in ``cwd`` with this checkout importable; fails the test on a non-zero exit."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    command = [TORCHRUN, "--standalone", "--nproc_per_node", "2", *args]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def test_two_processes_train_one_run_that_resumes_bit_identically(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    torchrun(["-m", "tests.training.torchrun_worker", str(out)], cwd=tmp_path)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2] and all(r["stopped"] for r in ranks)
    assert ranks[0]["straight_test"] == ranks[1]["straight_test"], "both ranks return the summed test counts"

    # fp16: rank 1 overflowed alone; both ranks skipped, kept parameters and momentum, and backed off to one scale
    for rank in ranks:
        assert rank["amp"] == {"skipped": True, "scale": 512.0, "params_unchanged": True, "momentum_unchanged": True}
        assert rank["scales"] == [512.0, 512.0]
    assert all(rank["awp_error"] < 1e-10 for rank in ranks), "AWP perturbs by the global batch's gradient"
    assert ranks[0]["replica_check"] == ranks[1]["replica_check"] != "passed"
    assert "hold different parameters" in ranks[0]["replica_check"]

    # the stopped run: one default folder (claimed by rank 0 only), epoch 1 of 2, every rank's RNG state
    (folder,) = (tmp_path / "runs").iterdir()
    checkpoint = torch.load(folder / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["world_size"] == 2 and len(checkpoint["rng_ranks"]) == 2
    assert not (folder / "result.json").exists()

    # resume it from the command line under torchrun: epoch 2 in the same folder, equal to the straight run
    done = torchrun(["-m", "engm_opacus", "train", "--resume", str(folder / "last.pt")], cwd=tmp_path)
    assert done.stdout.count("Robust-overfitting gap") == 1, "rank 0 alone prints the tables"
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [folder.name]
    result = json.loads((folder / "result.json").read_text())
    assert result["world_size"] == 2 and [r["epoch"] for r in result["history"]] == [1, 2]
    resumed, straight = (torch.load(path / "last.pt", weights_only=True) for path in (folder, out / "straight"))
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    assert resumed["history"][1]["train_loss"] == straight["history"][1]["train_loss"]
    assert result["test_last"] == ranks[0]["straight_test"]
