"""ENGM over data-parallel processes: one all-reduce of the weighted sums, the example count and the step flags.

Each rank computes its own examples' norms and weights (each ``g_i`` is local) and the local sums
``S_r = sum_{i on rank r} w_i g_i``. The direction of the job is the single-process one on the global
batch,

.. math::

    d = \\frac{\\sum_r S_r}{\\sum_r N_r},

exact also for uneven shards (Opacus's ``DistributedDPOptimizer`` divides by the world size
instead). The sums, the counts and the skip/non-finite flags travel in one ``SUM`` all-reduce of
one flat buffer, so every rank takes the same decision and the same step.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn


def data_parallel_world() -> int:
    """The number of processes of the default group (``1`` when ``torch.distributed`` is not initialized)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sums(
    params: List[nn.Parameter], examples: int, flags: Tuple[bool, ...], group: Optional[dist.ProcessGroup] = None
) -> Tuple[int, Tuple[bool, ...]]:
    """Replace every ``p.summed_grad`` by its sum over ranks (a rank without one contributes zeros).

    Returns the global example count and, per flag, whether any rank raised it.
    """
    reference = params[0]
    parts = [(p.summed_grad if p.summed_grad is not None else torch.zeros_like(p)).reshape(-1).to(reference.dtype) for p in params]
    scalars = torch.tensor([float(examples), *map(float, flags)], dtype=reference.dtype, device=reference.device)
    flat = torch.cat([*parts, scalars])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for p in params:
        p.summed_grad = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()
    totals = flat[offset:].tolist()
    return int(round(totals[0])), tuple(value > 0 for value in totals[1:])


def gather_examples(tensors: Tuple[torch.Tensor, ...], group: Optional[dist.ProcessGroup] = None) -> Tuple[torch.Tensor, ...]:
    """Each ``[N_r]`` tensor concatenated over the ranks (uneven ``N_r``), in rank order, on every rank.

    The input-norm variant calibrates its scale on the global batch's exact and input norms, so
    that every rank holds the scale one process would have.
    """
    gathered: List[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, [t.detach().cpu() for t in tensors], group=group)
    return tuple(torch.cat([part[k] for part in gathered]).to(tensors[k].device) for k in range(len(tensors)))


def skip_gradient_all_reduce(ddp: nn.parallel.DistributedDataParallel) -> None:
    """Register a comm hook that leaves each rank's local gradient in ``p.grad`` (no all-reduce):
    ENGM all-reduces its own weighted sums instead, so DDP's gradient all-reduce would be paid for nothing."""

    def local_gradient(_, bucket):  # no annotations: DDP compares them with the real classes
        future = torch.futures.Future()
        future.set_result(bucket.buffer())
        return future

    try:
        ddp.register_comm_hook(None, local_gradient)
    except RuntimeError as error:
        raise ValueError(
            f"make_engm could not replace DDP's gradient all-reduce ({error}). ENGM all-reduces its own weighted sums. "
            "Fix: pass a DistributedDataParallel model without a registered comm hook, before its first backward."
        ) from None
