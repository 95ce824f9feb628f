"""Run by ``test_torchrun.py`` under ``torchrun --nproc_per_node 2``: a stopped and a straight 2-epoch run, the fp16 scaler, the replica check.

``python -m tests.training.torchrun_worker OUT``: in the current folder, trains a 2-epoch run stopped
after epoch 1 (default run folder ``runs/...``) and the same run straight (``OUT/straight``); then
an fp16 ENGM step that overflows on rank 1 only; AWP's weight perturbation from uneven shards
against one process on the whole batch; then :func:`check_replicas` on parameters made to differ.
Each rank writes ``OUT/rank<r>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from engm_opacus import TrainConfig, make_engm, train
from engm_opacus.at.losses import get_at_loss
from engm_opacus.training.amp import SyncedGradScaler
from engm_opacus.training.distributed import check_replicas, data_parallel, gather_objects, setup, teardown
from engm_opacus.training.models import build_model
from tests.helpers.nets import groupnorm_cnn, images

TINY = dict(
    max_train_examples=36, batch_size=8, pgd_steps=1, step_size=4 / 255, width=4, norm="batch",
    max_val_examples=15, val_pgd_steps=1, max_test_examples=15, test_pgd_steps=1, progress=False, device="cpu",
)
"""2 processes x 4 examples per step, 18 examples per rank: 5 steps, the last of 2 examples per rank; BatchNorm."""


class Stop(Exception):
    """Ends the first run after epoch 1's checkpoint, as a kill would."""


def stop_after_first_epoch(record: dict) -> None:
    raise Stop


def overflow_on_rank_one(rank: int) -> dict:
    """One normal fp16 ENGM step (momentum exists), then one whose loss overflows on rank 1 only."""
    torch.manual_seed(0)
    model = build_model("small-cnn", num_classes=10, in_channels=1, norm="group", width=4)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    wrapped, optimizer = make_engm(data_parallel(model, torch.device("cpu")), sgd, gamma=1.0)
    scaler = SyncedGradScaler("cpu", init_scale=2.0**10)
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(rank))
    y = torch.arange(4) + rank

    def step(blow_up: bool) -> None:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(wrapped(x), y)
        scaler.scale(loss * 1e30 if blow_up else loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()

    step(False)
    params = [p.detach().clone() for p in model.parameters()]
    momentum = [sgd.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    step(rank == 1)
    return {
        "skipped": bool(optimizer.last_step.skipped),
        "scale": scaler.get_scale(),
        "params_unchanged": all(torch.equal(a, p) for a, p in zip(params, model.parameters())),
        "momentum_unchanged": all(torch.equal(m, sgd.state[p]["momentum_buffer"]) for m, p in zip(momentum, model.parameters())),
    }


def awp_error(rank: int) -> float:
    """Max relative error of AWP's ``v_W`` from shards of 5 and 3 examples against the 8 examples in one piece (float64)."""
    model = groupnorm_cnn()
    x, y = images(8, torch.Generator().manual_seed(3))
    awp = get_at_loss("awp-pgd-at")
    rows = slice(0, 5) if rank == 0 else slice(5, 8)
    sharded = awp.weight_perturbation(model, x[rows], y[rows], x[rows])
    whole = awp.weight_perturbation(model, x, y, x)  # every rank the same batch: the all-reduce only doubles g
    return max(float((v - w).norm() / w.norm()) for (_, v), (_, w) in zip(sharded, whole))


def main(out: Path) -> None:
    state, _ = setup("cpu")
    result: dict = {"rank": state.rank, "world_size": state.world_size}
    try:
        train(TrainConfig(epochs=2, **TINY), on_epoch_end=stop_after_first_epoch)
    except Stop:
        result["stopped"] = True
    straight = train(TrainConfig(epochs=2, out_dir=str(out / "straight"), **TINY))
    result["straight_test"] = straight.test_last
    result["amp"] = overflow_on_rank_one(state.rank)
    result["scales"] = gather_objects(result["amp"]["scale"], state)
    result["awp_error"] = awp_error(state.rank)
    model = build_model("small-cnn", num_classes=10, in_channels=1, norm="group", width=4)
    data_parallel(model, torch.device("cpu"))  # rank 0's weights everywhere
    check_replicas(model, state, epoch=0)
    with torch.no_grad():
        next(model.parameters()).add_(float(state.rank))
    try:
        check_replicas(model, state, epoch=0)
        result["replica_check"] = "passed"
    except RuntimeError as error:
        result["replica_check"] = str(error)
    (out / f"rank{state.rank}.json").write_text(json.dumps(result))
    teardown(state)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
