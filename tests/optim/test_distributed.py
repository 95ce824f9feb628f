"""ENGM over DistributedDataParallel (2 gloo processes on the CPU) is the one-process ENGM on the global batch."""

from __future__ import annotations

import copy
import traceback
from pathlib import Path
from typing import Callable, List, Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from engm_opacus import make_engm
from tests.helpers.naive import gamma_between, naive_norms, per_example_grads_copies, per_example_grads_loop
from tests.helpers.nets import images, mlp, preact_batchnorm

SHARDS = (5, 3)
"""Uneven shards: rank 0 holds 5 examples, rank 1 holds 3."""
STEPS = 3
HYPER = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)


def ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def batches(steps: int = STEPS) -> List[tuple]:
    generator = torch.Generator().manual_seed(0)
    return [images(sum(SHARDS), generator) for _ in range(steps)]


def shard(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    start = sum(SHARDS[:rank])
    return tensor[start : start + SHARDS[rank]]


def run_ranks(worker: Callable, tmp_path: Path, *args: object) -> List[dict]:
    """Run ``worker(rank, tmp_path, *args)`` in 2 gloo processes; return what each rank saved."""
    mp.spawn(_bootstrap, args=(worker, tmp_path, args), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]


def _bootstrap(rank: int, worker: Callable, tmp_path: Path, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=rank, world_size=2)
    try:
        result = worker(rank, tmp_path, *args)
    except Exception as error:  # reported to the test, which asserts on it
        result = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()}
    finally:
        dist.barrier()
    torch.save(result, tmp_path / f"rank{rank}.pt")
    dist.destroy_process_group()


def train_ddp(rank: int, tmp_path: Path, build: str, gamma: float) -> dict:
    model = {"mlp": mlp, "preact_batchnorm": preact_batchnorm}[build]()
    wrapped, optimizer = make_engm(DistributedDataParallel(model), torch.optim.SGD(model.parameters(), **HYPER), gamma=gamma)
    directions = []
    for x, y in batches():
        ce(wrapped, shard(x, rank), shard(y, rank)).backward()
        optimizer.step()
        directions.append([p.grad.clone() for p in model.parameters()])
        optimizer.zero_grad()
    return {"params": [p.detach().clone() for p in model.parameters()], "directions": directions}


def test_two_ranks_with_uneven_shards_equal_one_process_on_the_global_batch(tmp_path: Path) -> None:
    reference = mlp()
    x0, y0 = batches()[0]
    gamma = gamma_between(naive_norms(per_example_grads_loop(reference, ce, x0, y0)))
    ranks = run_ranks(train_ddp, tmp_path, "mlp", gamma)
    assert "error" not in ranks[0], ranks[0].get("trace")
    single, optimizer = make_engm(reference, torch.optim.SGD(reference.parameters(), **HYPER), gamma=gamma)
    for x, y in batches():
        ce(single, x, y).backward()
        optimizer.step()
        optimizer.zero_grad()
    for rank in ranks:
        for got, expected in zip(rank["params"], reference.parameters()):
            torch.testing.assert_close(got, expected.detach(), rtol=1e-10, atol=1e-12)
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b), "the ranks hold different parameters"


def test_batchnorm_direction_is_per_rank_copies_combined_over_the_global_batch(tmp_path: Path) -> None:
    """BatchNorm under DDP: statistics per rank; g_i = B_r dL_r/dtheta^(i) on rank r; d over all 8 examples."""
    reference = preact_batchnorm()
    x, y = batches(1)[0]
    per_example = []
    for rank in range(2):
        per_example += per_example_grads_copies(copy.deepcopy(reference), ce, shard(x, rank), shard(y, rank))
    norms = naive_norms(per_example)
    gamma = gamma_between(norms)
    weights = 1.0 / norms.clamp(min=gamma)
    expected = [sum(w * g[k] for w, g in zip(weights, per_example)) / len(per_example) for k in range(len(per_example[0]))]
    ranks = run_ranks(train_ddp, tmp_path, "preact_batchnorm", gamma)
    assert "error" not in ranks[0], ranks[0].get("trace")
    for rank in ranks:
        for got, want in zip(rank["directions"][0], expected):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def wrong_order(rank: int, tmp_path: Path, how: str) -> dict:
    model = mlp()
    if how == "ddp-outside":
        wrapped, optimizer = make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=1.0)
        wrapped = DistributedDataParallel(wrapped)
    else:  # no data-parallel wrapper at all, in a 2-process job
        wrapped, optimizer = make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=1.0)
    x, y = batches(1)[0]
    ce(wrapped, shard(x, rank), shard(y, rank)).backward()
    optimizer.step()
    return {}


@pytest.mark.parametrize("how", ["ddp-outside", "no-wrapper"])
def test_combinations_that_would_train_different_models_per_rank_are_refused(tmp_path: Path, how: str) -> None:
    ranks = run_ranks(wrong_order, tmp_path, how)
    for rank in ranks:
        assert "torch.distributed runs 2 processes" in rank.get("error", ""), rank
        assert "make_engm(DistributedDataParallel(model)" in rank["error"]


def existing_comm_hook(rank: int, tmp_path: Path) -> dict:
    model = mlp()
    ddp = DistributedDataParallel(model)
    ddp.register_comm_hook(None, lambda state, bucket: torch.futures.Future())
    make_engm(ddp, torch.optim.SGD(model.parameters(), lr=0.1), gamma=1.0)
    return {}


def test_a_model_with_its_own_comm_hook_is_refused(tmp_path: Path) -> None:
    ranks = run_ranks(existing_comm_hook, tmp_path)
    assert "could not replace DDP's gradient all-reduce" in ranks[0].get("error", ""), ranks[0]


def pgd_like_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Two sign-gradient steps by ``torch.autograd.grad`` w.r.t. the input (mean-reduced CE)."""
    x_adv = x.clone()
    for _ in range(2):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(ce(model, x_adv, y), x_adv)
        x_adv = (x_adv.detach() + 0.05 * grad.sign()).detach()
    return x_adv


def input_norm_steps(model: nn.Module, optimizer: torch.optim.Optimizer, rank: Optional[int]) -> List[dict]:
    """Attack then train on each batch (the rank's shard, or the global batch for ``rank=None``); the step stats."""
    stats = []
    for x, y in batches():
        if rank is not None:
            x, y = shard(x, rank), shard(y, rank)
        ce(model, pgd_like_attack(model, x, y), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        stats.append({"scale": optimizer.last_step.scale, "gamma": optimizer.last_step.gamma})
    return stats


def train_input_norm_ddp(rank: int, tmp_path: Path, gamma: float, options: dict) -> dict:
    model = mlp()
    wrapped, optimizer = make_engm(
        DistributedDataParallel(model), torch.optim.SGD(model.parameters(), **HYPER), gamma=gamma, variant="input-norm",
        **options,
    )
    stats = input_norm_steps(wrapped, optimizer, rank)
    return {"params": [p.detach().clone() for p in model.parameters()], "stats": stats}


@pytest.mark.parametrize(
    ("gamma", "options"),
    [(0.5, {"calibrate_every": 2}), (0.5, {"calibrate_every": 2, "input_grad_source": "attack"})],
    ids=["backward-source", "attack-source-fast-path"],
)
def test_input_norm_variant_calibrates_on_the_global_batch(tmp_path: Path, gamma: float, options: dict) -> None:
    """Uneven shards (5 and 3 rows): the scale and the parameters of both ranks equal one process's on the 8 rows, on
    calibration and fast-path steps."""
    reference = mlp()
    ranks = run_ranks(train_input_norm_ddp, tmp_path, gamma, options)
    assert "error" not in ranks[0], ranks[0].get("trace")
    single, optimizer = make_engm(
        reference, torch.optim.SGD(reference.parameters(), **HYPER), gamma=gamma, variant="input-norm", **options
    )
    stats = input_norm_steps(single, optimizer, None)
    for rank in ranks:
        for got, expected in zip(rank["stats"], stats):
            assert got == pytest.approx(expected, rel=1e-12)
        for got, expected in zip(rank["params"], reference.parameters()):
            torch.testing.assert_close(got, expected.detach(), rtol=1e-10, atol=1e-12)
