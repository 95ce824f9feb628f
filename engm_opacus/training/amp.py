"""Mixed precision of a training run (``--amp``): the autocast dtype, and the fp16 ``GradScaler`` kept equal on every rank.

| ``--amp`` | training attack and loss | backward and step |
|---|---|---|
| ``off`` | full precision | ``loss.backward(); optimizer.step()`` |
| ``bf16`` | ``torch.autocast(device, torch.bfloat16)`` | unscaled (bf16 has float32's exponent range) |
| ``fp16`` | ``torch.autocast(device, torch.float16)`` | ``torch.amp.GradScaler``: scaled backward, ``scaler.step``, ``scaler.update`` |

The step itself is :func:`engm_opacus.at.step.train_step`. Validation and test evaluation run in
full precision. The scaler's state (scale, growth tracker) is saved in checkpoints, so an fp16
run resumes with the scale it had.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

AMP_MODES: Tuple[str, ...] = ("off", "bf16", "fp16")
"""The values of ``TrainConfig.amp`` / ``--amp``."""
AMP_DTYPES: Dict[str, Optional[torch.dtype]] = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The autocast dtype of each mode (``None``: no autocast)."""


class SyncedGradScaler(torch.amp.GradScaler):
    """A ``GradScaler`` whose :meth:`update` treats an overflow on any rank as an overflow on every rank.

    Under ENGM each rank's ``p.grad`` is local (ENGM all-reduces its own sums), so the scaler's
    per-rank inf check can differ between ranks; ENGM skips the step on every rank when any rank
    overflowed, and this keeps the scales equal too (one tiny all-reduce per step).
    """

    def update(self, new_scale: Optional[float] = None) -> None:  # type: ignore[override]
        """All-reduce (max) the found-inf flags of this step, then ``GradScaler.update``."""
        if new_scale is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for state in self._per_optimizer_states.values():
                for found_inf in state["found_inf_per_device"].values():
                    dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
        super().update(new_scale)


def autocast_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``amp`` on ``device``.

    Raises:
        ValueError: unknown mode, or ``bf16`` on a GPU without bfloat16 support.
    """
    if amp not in AMP_DTYPES:
        raise ValueError(f"Unknown amp {amp!r}. Fix: use one of {', '.join(AMP_MODES)}.")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("--amp bf16 needs a GPU with bfloat16 support (Ampere or newer). Fix: use --amp fp16.")
    return AMP_DTYPES[amp]


def make_scaler(amp: str, device: torch.device, distributed: bool) -> Optional[torch.amp.GradScaler]:
    """A ``GradScaler`` for ``fp16`` (:class:`SyncedGradScaler` when several processes train), else ``None``."""
    if amp != "fp16":
        return None
    return (SyncedGradScaler if distributed else torch.amp.GradScaler)(device.type)
