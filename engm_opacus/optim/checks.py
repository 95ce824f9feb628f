"""The optimizer's guards against a silently wrong update: records that do not sum to ``p.grad``, gradients
that reached ``p.grad`` outside a recorded layer call, and records that outlived ``p.grad``."""

from __future__ import annotations

from typing import Dict, List, Set, Tuple

import torch
from torch import nn

from engm_opacus.per_example import BackwardRecord, LayerReduction

VERIFY_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}
"""Tolerance of the first-step check, relative to the norm of the whole ``p.grad``, per dtype; ``5e-2`` when the backward ran in
reduced precision (autocast): ``p.grad`` then comes from bf16/fp16 products, ENGM's sums from fp32."""


def verify_against_grads(
    reductions: List[Tuple[LayerReduction, int]], own: Set[nn.Parameter], reduced_precision: bool, names: Dict[nn.Parameter, str]
) -> None:
    """Raise if ``sum_i dL/dtheta^(i)`` over the records differs from ``p.grad`` (module docstring of
    :mod:`engm_opacus.per_example`: the per-example gradients of a backward sum to its gradient)."""
    totals: Dict[nn.Parameter, torch.Tensor] = {}
    for reduction, rows in reductions:
        for p, grad in reduction.weighted_grads(torch.ones(rows)).items():
            totals[p] = grad if p not in totals else totals[p] + grad
    compared = [(p, total, p.grad.to(total.dtype)) for p, total in totals.items() if p in own and p.grad is not None]
    scale = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for _, _, g in compared]))) if compared else 0.0
    tolerance = 5e-2 if reduced_precision else VERIFY_TOLERANCE.get(compared[0][2].dtype, 5e-2) if compared else 0.0
    mismatched = [
        f"{names.get(p, '?')} (error {float(torch.linalg.vector_norm(total - grad)) / (scale + 1e-30):.2g} of ||p.grad||)"
        for p, total, grad in compared
        if float(torch.linalg.vector_norm(total - grad)) > tolerance * scale
    ]
    if mismatched:
        raise RuntimeError(
            f"The per-example gradients ENGM recorded do not sum to p.grad for {mismatched[:5]}: part of these "
            "parameters' gradient came from outside their layer's forward (tied weights, F.linear(x, layer.weight), "
            "a gradient set or cleared by hand between backward() and step()). The ENGM update would be wrong. "
            "Fix: use each parameter only through its own layer's forward, and clear gradients only with the "
            "returned optimizer's or model's zero_grad()."
        )


def check_coverage(
    records: List[BackwardRecord], accumulated: Set[nn.Parameter], own: Set[nn.Parameter], names: Dict[nn.Parameter, str]
) -> None:
    """Raise if a gradient reached ``p.grad`` outside a recorded layer call, or records outlived ``p.grad``."""
    recorded = {p for record in records for p in record.reached()}
    outside = [names.get(p, "?") for p in accumulated - recorded]
    if outside:
        raise RuntimeError(
            f"Parameters {outside[:5]} received gradient outside their layer's forward (e.g. tied weights or "
            "F.linear(x, layer.weight)), where ENGM cannot see per-example gradients; the update would be wrong. "
            "Fix: use each parameter only through its own layer's forward."
        )
    cleared = [names.get(p, "?") for p in recorded & own if p.grad is None]
    if cleared:
        raise RuntimeError(
            f"p.grad of {cleared[:5]} was cleared after the backward pass, but not through optimizer.zero_grad() "
            "or model.zero_grad() of the objects make_engm returned, so ENGM still holds that pass's per-example "
            "data. Fix: clear gradients with the returned optimizer's or model's zero_grad()."
        )
