"""AWP (Wu et al., "Adversarial Weight Perturbation Helps Robust Generalization", NeurIPS 2020).

Wraps an adapter (PGD-AT or TRADES). Per step, with ``x_adv`` crafted at the
unperturbed weights ``w``:

1. ascent direction on the wrapped method's batch loss at ``x_adv``:
   ``g_W = grad_W (1/B) sum_i l_i(w)`` for every weight ``W`` (a parameter named
   ``*weight*`` with ``ndim > 1``: conv, linear, embedding weights; biases and
   normalization parameters are skipped, as the reference ``diff_in_weights``);
2. layer-wise relative perturbation ``v_W = gamma_awp * ||W|| * g_W / (||g_W|| + 1e-20)``
   (the reference takes one SGD step on a proxy model and rescales the difference to
   ``||W||``; the proxy learning rate cancels), added to the weights;
3. the wrapped method's training losses at ``w + v`` (the per-example gradients that
   ENGM normalizes are taken at the perturbed weights, where the reference takes its
   gradient), backward and ``optimizer.step()`` by :func:`engm_opacus.step.train_step`;
4. :meth:`AWP.restore_weights`: ``W <- W_0 + (W - (W_0 + v))``, i.e. the outer update
   computed at ``w + v`` applied to ``w`` (the reference subtracts ``v``; this form gives
   back ``W_0`` bit for bit when the step did not move ``W``).

Unlike the wrapped losses, ``l_i`` at ``w + v`` depends on the whole batch, through ``v``.
The ascent (step 1) runs with Opacus's per-sample hooks paused and through
``torch.autograd.grad``, so it leaves no ``grad_sample`` and no ``.grad``; buffers
(BatchNorm running statistics) are restored after it, as the reference computes it on a
proxy model.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

from engm_opacus.attacks import per_example_hooks_paused
from engm_opacus.losses.base import ATLossOutput, AttackResult, AttackThenLoss

NORM_EPS = 1e-20


def perturbable_weights(model: nn.Module) -> List[nn.Parameter]:
    """Trainable parameters AWP perturbs: ``ndim > 1`` and ``"weight"`` in the name (reference ``diff_in_weights``)."""
    return [p for name, p in model.named_parameters() if p.requires_grad and p.ndim > 1 and "weight" in name]


class AWP:
    """Adversarial weight perturbation around ``inner`` (an :class:`AttackThenLoss`).

    Args:
        inner: the wrapped adapter, e.g. ``PGDAT()`` or ``TRADES(beta=6.0)``.
        gamma_awp: relative size of the weight perturbation (default ``5e-3``).
    """

    def __init__(self, inner: AttackThenLoss, *, gamma_awp: float = 5e-3):
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
        self._pending: List[Tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []

    def weight_perturbation(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: AttackResult
    ) -> List[Tuple[nn.Parameter, torch.Tensor]]:
        """``[(W, v_W)]``: the layer-wise ascent step of the module docstring, at the current weights."""
        weights = perturbable_weights(model)
        buffers = [(buffer, buffer.clone()) for buffer in model.buffers()]
        with per_example_hooks_paused(model), torch.enable_grad():
            batch_loss = self.inner.loss_at(model, x, y, attack).per_example.mean()
            grads = torch.autograd.grad(batch_loss, weights, allow_unused=True)
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        return [
            (w, self.gamma_awp * w.detach().norm() / (g.norm() + NORM_EPS) * g)
            for w, g in zip(weights, grads)
            if g is not None
        ]

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, track_input_grad: bool = False
    ) -> ATLossOutput:
        """Attack at ``w``, perturb to ``w + v``, return the wrapped losses at ``w + v`` (weights stay perturbed)."""
        if self._pending:
            raise RuntimeError(
                "The weights are still AWP-perturbed from the previous call. "
                "Fix: call restore_weights() after optimizer.step() (engm_opacus.step.train_step does)."
            )
        attack = self.inner.attack(model, x, y)
        perturbation = self.weight_perturbation(model, x, y, attack)
        with torch.no_grad():
            for w, v in perturbation:
                original = w.detach().clone()
                w.add_(v)
                self._pending.append((w, original, w.detach().clone()))
        return self.inner.loss_at(model, x, y, attack, track_input_grad=track_input_grad)

    def restore_weights(self) -> None:
        """``W <- W_0 + (W - W_perturbed)`` for every perturbed weight; a no-op when nothing is perturbed."""
        with torch.no_grad():
            for w, original, perturbed in self._pending:
                w.copy_(original + (w - perturbed))
        self._pending = []
