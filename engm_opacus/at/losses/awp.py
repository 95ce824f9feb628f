"""AWP: adversarial weight perturbation around PGD-AT or TRADES (Wu et al., "Adversarial Weight Perturbation Helps Robust Generalization", NeurIPS 2020).

Per step, with ``x_adv`` crafted at the unperturbed weights ``w``:

1. ascent direction on the wrapped method's mean-reduced loss at ``x_adv``:
   ``g_W = grad_W L(w)`` for every weight ``W`` (a parameter named ``*weight*`` with
   ``ndim > 1``: conv, linear, embedding weights; biases and normalization parameters are
   skipped, as the reference ``diff_in_weights``);
2. layer-wise relative perturbation

   .. math::

       v_W = \\gamma_{awp} \\, \\|W\\| \\, \\frac{g_W}{\\|g_W\\| + 10^{-20}}

   (the reference takes one SGD step on a proxy model and rescales the difference to
   ``||W||``; the proxy learning rate cancels), added to the weights; ``gamma_awp = 5e-3``
   by default, Wu et al.'s value;
3. the wrapped method's loss ``L(w + v)`` is returned: the user's ``loss.backward()`` and
   ``optimizer.step()`` (:func:`engm_opacus.at.step.train_step`) take the gradient at the
   perturbed weights, where the reference takes it;
4. :meth:`AWP.restore_weights`: ``W <- W_0 + (W - (W_0 + v))``, i.e. the outer update
   computed at ``w + v`` applied to ``w`` (the reference subtracts ``v``; this form gives
   back ``W_0`` bit for bit when the step did not move ``W``).

The ascent (step 1) uses ``torch.autograd.grad``, so it writes no ``.grad`` and an
ENGM-wrapped model records nothing for it (it does not accumulate into the parameters);
buffers (BatchNorm running statistics) are restored after it, as the reference computes
it on a proxy model.

Data parallelism (``torch.distributed`` initialized with several processes, e.g. under
``torchrun``): each rank's ``B_r * g_W`` is summed over the ranks before step 2, so ``v_W`` is the
one-process perturbation on the global batch (the normalization cancels the ``1/B``) and every
rank perturbs, and restores, identically.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from engm_opacus.at.losses.base import ATLossOutput, AttackThenLoss

NORM_EPS = 1e-20
DEFAULT_GAMMA_AWP = 5e-3


def perturbable_weights(model: nn.Module) -> List[nn.Parameter]:
    """Trainable parameters AWP perturbs: ``ndim > 1`` and ``"weight"`` in the name (reference ``diff_in_weights``)."""
    return [p for name, p in model.named_parameters() if p.requires_grad and p.ndim > 1 and "weight" in name]


def global_batch_gradients(grads: Sequence[Optional[torch.Tensor]], rows: int) -> List[Optional[torch.Tensor]]:
    """``sum_r B_r g_r`` over the ranks of a multi-process ``torch.distributed`` job (one ``SUM`` all-reduce); ``grads`` as they are otherwise.

    ``g_r`` is rank ``r``'s gradient of its mean-reduced loss over ``B_r = rows`` rows, so the sum is
    ``B`` times the global batch's gradient: the same direction, which is all AWP uses.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return list(grads)
    present = [g for g in grads if g is not None]
    if not present:
        return list(grads)
    flat = torch.cat([g.reshape(-1).to(present[0].dtype) for g in present]) * rows
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out: List[Optional[torch.Tensor]] = []
    offset = 0
    for g in grads:
        if g is None:
            out.append(None)
            continue
        out.append(flat[offset : offset + g.numel()].view_as(g).to(g.dtype))
        offset += g.numel()
    return out


class AWP:
    """Adversarial weight perturbation around ``inner`` (an :class:`AttackThenLoss`).

    Args:
        inner: the wrapped adapter, e.g. ``PGDAT()`` or ``TRADES(beta=6.0)``.
        gamma_awp: relative size of the weight perturbation (default ``5e-3``).

    Raises:
        TypeError: ``inner`` is not an :class:`AttackThenLoss`.
        ValueError: ``gamma_awp`` is not a number ``>= 0``.
    """

    def __init__(self, inner: AttackThenLoss, *, gamma_awp: float = DEFAULT_GAMMA_AWP):
        if not isinstance(inner, AttackThenLoss):
            raise TypeError(
                f"AWP wraps an AttackThenLoss adapter, got {type(inner).__name__}. "
                "Fix: AWP(PGDAT()) or AWP(TRADES()), or get_at_loss('awp-pgd-at')."
            )
        if isinstance(gamma_awp, bool) or not isinstance(gamma_awp, (int, float)) or not gamma_awp >= 0:
            raise ValueError(f"gamma_awp must be a number >= 0, got {gamma_awp!r}. Fix: e.g. gamma_awp=5e-3.")
        self.inner = inner
        self.gamma_awp = float(gamma_awp)
        self.name = f"awp-{inner.name}"
        self.attack_loss_is_training_loss = inner.attack_loss_is_training_loss
        self._pending: List[Tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []

    def weight_perturbation(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor
    ) -> List[Tuple[nn.Parameter, torch.Tensor]]:
        """``[(W, v_W)]``: the layer-wise ascent step of the module docstring, at the current weights."""
        weights = perturbable_weights(model)
        buffers = [(buffer, buffer.clone()) for buffer in model.buffers()]
        with torch.enable_grad():
            loss = self.inner.loss_at(model, x, y, x_adv).loss
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
        grads = global_batch_gradients(grads, len(x))
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        return [
            (w, self.gamma_awp * w.detach().norm() / (g.norm() + NORM_EPS) * g)
            for w, g in zip(weights, grads)
            if g is not None
        ]

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> ATLossOutput:
        """Attack at ``w``, perturb to ``w + v``, return the wrapped loss at ``w + v`` (weights stay perturbed).

        Raises:
            RuntimeError: the weights are still perturbed from the previous call.
        """
        if self._pending:
            raise RuntimeError(
                "The weights are still AWP-perturbed from the previous call. "
                "Fix: call restore_weights() after optimizer.step() (engm_opacus.at.train_step does)."
            )
        x_adv = self.inner.attack(model, x, y)
        perturbation = self.weight_perturbation(model, x, y, x_adv)
        with torch.no_grad():
            for w, v in perturbation:
                original = w.detach().clone()
                w.add_(v)
                self._pending.append((w, original, w.detach().clone()))
        return self.inner.loss_at(model, x, y, x_adv)

    def restore_weights(self) -> None:
        """``W <- W_0 + (W - W_perturbed)`` for every perturbed weight; a no-op when nothing is perturbed."""
        with torch.no_grad():
            for w, original, perturbed in self._pending:
                w.copy_(original + (w - perturbed))
        self._pending = []
