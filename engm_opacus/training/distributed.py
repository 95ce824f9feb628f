"""A training run's data-parallel side under ``torchrun``: process group, device, wrapper, samplers, seeds, collectives.

``engm-opacus train`` run by ``torchrun --nproc_per_node N`` (``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` in the environment, ``WORLD_SIZE > 1``) joins the process group (gloo on the CPU,
NCCL for ``--device cuda``, which takes ``LOCAL_RANK``'s GPU) and trains one replica per process:

* the model is built identically on every rank and wrapped in ``DistributedDataParallel`` (MSGD)
  or ``make_engm(DistributedDataParallel(model), ...)`` (ENGM, both variants: the weighted sums
  and the example counts are all-reduced, see :mod:`engm_opacus.optim.distributed`);
* ``--batch-size`` is the **global** batch: each rank takes ``batch_size / N`` examples of every
  step from a ``DistributedSampler`` (shuffled by ``seed + epoch``; an epoch's examples are padded
  to a multiple of ``N`` by repeating ``< N`` of them, so every rank takes the same number of steps);
* each rank's global RNG (the training attack's random start) is seeded with :func:`rank_seed`;
* validation and test accuracy are computed on contiguous shards of the split, one per rank, and
  the counts are summed (every example once), after rank 0's BatchNorm statistics are broadcast;
* only rank 0 writes the run folder and prints.

Without ``torchrun`` (or with ``WORLD_SIZE=1``) nothing of this applies. A process group the
caller initialized is used as it is and left open.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from engm_opacus.training.runtime import resolve_device

TIMEOUT = timedelta(hours=2)
"""Collective timeout of the process group this module creates (a long evaluation on one rank must not end the job)."""


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in the job.

    Attributes:
        rank, world_size, local_rank: the ``torch.distributed`` coordinates (``0, 1, 0`` for one process).
        owns_group: this run created the process group (and destroys it at its end).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        """More than one process trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def launched_world_size() -> int:
    """``WORLD_SIZE`` set by ``torchrun`` (1 when absent)."""
    return _env_int("WORLD_SIZE") or 1


def nproc_per_node(state: Distributed) -> int:
    """Processes on this node (``LOCAL_WORLD_SIZE``, else the world size): what ``torchrun --nproc_per_node`` was given."""
    return _env_int("LOCAL_WORLD_SIZE") or state.world_size


def device_for(name: str, local_rank: int, world_size: int) -> torch.device:
    """:func:`~engm_opacus.training.runtime.resolve_device`, with CUDA on the ``local_rank``-th GPU when several processes train."""
    device = resolve_device(name)
    if device.type != "cuda" or world_size == 1:
        return device
    if local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"LOCAL_RANK {local_rank} but torch sees {torch.cuda.device_count()} GPU(s). "
            "Fix: run torchrun with --nproc_per_node at most the number of GPUs."
        )
    return torch.device("cuda", local_rank)


def setup(device_name: str) -> Tuple[Distributed, torch.device]:
    """Join the job's process group (or use the caller's), pick the device; one process: ``(Distributed(), device)``.

    Raises:
        ValueError: ``--device cuda`` without a GPU, or more processes on this node than GPUs.
    """
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        local_rank = _env_int("LOCAL_RANK")
        local_rank = rank if local_rank is None else local_rank
        state = Distributed(rank, world, local_rank, owns_group=False)
    elif launched_world_size() > 1:
        world, rank, local_rank = launched_world_size(), _env_int("RANK") or 0, _env_int("LOCAL_RANK") or 0
        state = Distributed(rank, world, local_rank, owns_group=True)
    else:
        return Distributed(), resolve_device(device_name)
    device = device_for(device_name, state.local_rank, state.world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if state.owns_group:
        if device.type == "cuda":
            dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=TIMEOUT)
    return state, device


def teardown(state: Distributed) -> None:
    """Destroy the process group if :func:`setup` created it."""
    if state.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def per_rank_batch(batch_size: int, world_size: int) -> int:
    """``batch_size / world_size``: each rank's share of the global batch.

    Raises:
        ValueError: ``batch_size`` is not a multiple of ``world_size``.
    """
    if batch_size % world_size:
        raise ValueError(
            f"--batch-size {batch_size} is the global batch and must split evenly over the {world_size} processes. "
            f"Fix: use a multiple of {world_size} (e.g. {max(world_size, batch_size - batch_size % world_size)})."
        )
    return batch_size // world_size


def data_parallel(model: nn.Module, device: torch.device) -> nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel(model)`` on ``device`` (this broadcasts rank 0's parameters and buffers)."""
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def train_loader(dataset: Dataset, batch_size: int, seed: int, state: Distributed) -> DataLoader:
    """This rank's loader of ``batch_size`` (per-rank) examples from a shuffling ``DistributedSampler`` (call ``set_epoch``)."""
    sampler = DistributedSampler(dataset, num_replicas=state.world_size, rank=state.rank, shuffle=True, seed=seed, drop_last=False)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=0)


def shard(dataset: Dataset, state: Distributed) -> Dataset:
    """This rank's contiguous part of ``dataset`` (sizes differ by at most one; every example in exactly one part)."""
    n = len(dataset)  # type: ignore[arg-type]
    start, end = (n * state.rank) // state.world_size, (n * (state.rank + 1)) // state.world_size
    return Subset(dataset, range(start, end))


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s global RNG: ``seed`` on rank 0 (one process unchanged), distinct on the others."""
    return seed if rank == 0 else (seed + 1_000_003 * rank) % 2**63


def _reduce_device() -> torch.device:
    """Where collectives of small tensors run: the current GPU under NCCL, else the CPU."""
    backend = dist.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def sum_over_ranks(values: Sequence[float], state: Distributed) -> List[float]:
    """Each of ``values`` summed over the ranks (float64; identity for one process)."""
    if not state.enabled:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


@torch.no_grad()
def broadcast_state(model: nn.Module, state: Distributed, *, parameters: bool = True) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) and, when ``parameters``, its parameters into every rank's ``model``."""
    if not state.enabled:
        return
    tensors = list(model.buffers()) + (list(model.parameters()) if parameters else [])
    for tensor in tensors:
        dist.broadcast(tensor.data, src=0)


@torch.no_grad()
def parameter_checksums(model: nn.Module, state: Distributed) -> List[float]:
    """Every rank's float64 sum of its parameters (one entry per rank); equal entries: identical replicas."""
    local = sum(float(p.detach().double().sum()) for p in model.parameters())
    if not state.enabled:
        return [local]
    device = _reduce_device()
    gathered = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(state.world_size)]
    dist.all_gather(gathered, torch.tensor([local], dtype=torch.float64, device=device))
    return [float(t) for t in gathered]


def check_replicas(model: nn.Module, state: Distributed, epoch: int) -> None:
    """Raise ``RuntimeError`` if the ranks' parameters differ (they never should: every rank takes the same step)."""
    sums = parameter_checksums(model, state)
    if any(value != sums[0] for value in sums):
        raise RuntimeError(
            f"The {state.world_size} processes hold different parameters after epoch {epoch} (checksums {sums}). "
            "This is a bug in engm-opacus's data-parallel step; please report it with the command you ran."
        )


def broadcast_object(value: Any, state: Distributed) -> Any:
    """Rank 0's ``value`` on every rank (picklable objects)."""
    if not state.enabled:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_objects(value: Any, state: Distributed) -> List[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not state.enabled:
        return [value]
    gathered: List[Any] = [None] * state.world_size
    dist.all_gather_object(gathered, value)
    return gathered
