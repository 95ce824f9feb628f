"""Per-example norms of gradients shaped ``G_i = sum_t b_{i,t} a_{i,t}^T`` (Linear and convolution weights).

With ``A_i`` the ``[T, D]`` inputs and ``B_i`` the ``[T, P]`` output gradients of example ``i``
over ``T`` positions (sequence positions, convolution output positions, and the positions of
every call of the layer concatenated), the weight gradient is ``G_i = B_i^T A_i`` and

.. math::

    \\|G_i\\|_F^2 = \\sum_{t,s} (a_t \\cdot a_s)(b_t \\cdot b_s)
    \\quad\\text{(ghost norm, } O(T^2 (D + P))\\text{)}
    \\quad\\text{or}\\quad \\|B_i^T A_i\\|_F^2 \\quad\\text{(instantiated, } O(T P D)\\text{)},

whichever costs fewer operations (Bu et al., ICML 2023, book-keeping); ``T = 1`` gives
``||a||^2 ||b||^2``. Work is done in chunks of examples so that no temporary exceeds
:data:`CHUNK_ELEMENTS` or the inputs' own size, whichever is larger.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 22
"""Floor of the per-chunk temporary budget (elements)."""


def prefer_ghost(positions: int, d: int, p: int) -> bool:
    """Whether the ghost norm (``T^2 (D + P)``) costs fewer operations than instantiating ``G_i`` (``T P D``)."""
    return positions * (d + p) < p * d


def outer_product_squared_norms(a: torch.Tensor, b: torch.Tensor, *, ghost: bool) -> torch.Tensor:
    """``[B]`` squared Frobenius norms ``sum_g ||B_{i,g}^T A_{i,g}||^2``.

    Args:
        a: ``[B, G, T, D]`` inputs per example, group and position.
        b: ``[B, G, T, P]`` output gradients per example, group and position.
        ghost: ghost norm (``True``) or instantiated ``G_i`` (``False``); see :func:`prefer_ghost`.
    """
    n, groups, positions, d = a.shape
    p = b.shape[-1]
    if positions == 1:
        return (squared_group_norms(a) * squared_group_norms(b)).sum(1)
    per_example = groups * (positions * positions if ghost else p * d)
    budget = max(CHUNK_ELEMENTS, a.numel() + b.numel())
    chunk = max(1, min(n, budget // max(per_example, 1)))
    out = []
    for start in range(0, n, chunk):
        a_chunk, b_chunk = a[start : start + chunk], b[start : start + chunk]
        if ghost:
            gram_a = torch.matmul(a_chunk, a_chunk.transpose(-1, -2))
            gram_b = torch.matmul(b_chunk, b_chunk.transpose(-1, -2))
            out.append((gram_a * gram_b).sum((1, 2, 3)))
        else:
            out.append(squared_group_norms(torch.matmul(b_chunk.transpose(-1, -2), a_chunk)).sum(1))
    return torch.cat(out)


def bias_squared_norms(b: torch.Tensor) -> torch.Tensor:
    """``[B]`` squared norms of the bias gradients ``sum_t b_{i,t}`` from ``b`` of shape ``[B, G, T, P]``."""
    return squared_group_norms(b.sum(2, keepdim=True)).sum(1)


def squared_group_norms(values: torch.Tensor) -> torch.Tensor:
    """``[B, G]`` squared norms over the last two dimensions of ``values`` (one fused pass)."""
    return torch.linalg.vector_norm(values, dim=(-2, -1)).square()
