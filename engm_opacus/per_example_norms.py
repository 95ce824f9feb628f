"""Per-example gradient norms ``n_i = ||g_i||_2`` over all trainable parameters.

This module is the single source of the norms that :mod:`engm_opacus.weights`
turns into ENGM weights. From materialized per-sample gradients (Opacus
``p.grad_sample``, shape ``[B, *p.shape]``):

.. math::

    n_i = \\sqrt{\\sum_{p} \\|g_{i,p}\\|_2^2} = \\big\\| (\\|g_{i,p}\\|_2)_p \\big\\|_2

(the per-parameter norms first, as Opacus does, so no squared copy of ``g`` is allocated).
"""

from __future__ import annotations

from typing import Sequence

import torch


def norms_from_grad_samples(grad_samples: Sequence[torch.Tensor]) -> torch.Tensor:
    """Return ``[B]`` per-example norms of the concatenation of all parameters' per-sample gradients.

    Args:
        grad_samples: one tensor per parameter, each ``[B, *param.shape]``.

    Raises:
        ValueError: if ``grad_samples`` is empty or the batch sizes disagree.
    """
    if len(grad_samples) == 0:
        raise ValueError(
            "No per-sample gradients to take norms of. Fix: run loss.backward() on the "
            "model returned by make_engm before optimizer.step()."
        )
    batch_sizes = {len(g) for g in grad_samples}
    if len(batch_sizes) != 1:
        raise ValueError(
            f"Per-sample gradients have different batch sizes {sorted(batch_sizes)}; a parameter "
            "was used by only part of the batch. Fix: make every trainable parameter see every example."
        )
    per_parameter = [torch.linalg.vector_norm(g.reshape(len(g), -1), dim=1) for g in grad_samples]
    device = per_parameter[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in per_parameter], dim=1), dim=1)
