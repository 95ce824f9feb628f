"""``ENGMOptimizer``: Opacus's ``DPOptimizer`` with normalizing instead of clipping and no noise.

For the per-sample gradients ``g_i`` that a ``GradSampleModule`` stores in
``p.grad_sample``:

.. math::

    n_i = \\|g_i\\|_2,\\quad w_i = \\frac{1}{\\max(n_i, \\gamma)},\\quad
    d = \\frac{1}{B}\\sum_i w_i g_i

``d`` is written to ``p.grad`` and the wrapped optimizer (``torch.optim.SGD`` by
default) steps on it exactly as it would on a plain mini-batch gradient, so weight
decay, momentum, dampening and Nesterov are SGD's own. Since
``w_i = (1/gamma) * min(1, gamma/n_i)``, this is DP-SGD's per-sample clipping with
``max_grad_norm = gamma``, zero noise, and the update scaled by ``1/gamma``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
from opacus.optimizers.optimizer import DPOptimizer, _check_processed_flag, _mark_as_processed

from engm_opacus.per_example_norms import norms_from_grad_samples
from engm_opacus.weights import engm_weights, validate_gamma

NonFinitePolicy = Literal["raise", "skip"]


@dataclass(frozen=True)
class ENGMStepStats:
    """What the last ENGM step saw; computed from tensors the step already had.

    Attributes:
        per_example_norms: ``[B]`` norms ``n_i`` (detached).
        weights: ``[B]`` weights ``w_i = 1/max(n_i, gamma)`` (detached).
        fraction_above_gamma: share of examples with ``n_i > gamma`` (those that were normalized).
        direction_norm: ``||d||_2`` of the direction handed to the wrapped optimizer
            (``nan`` when the step was skipped).
        skipped: ``True`` when the step was skipped for non-finite gradients.
    """

    per_example_norms: torch.Tensor
    weights: torch.Tensor
    fraction_above_gamma: float
    direction_norm: float
    skipped: bool


def require_per_example_losses(losses: torch.Tensor) -> torch.Tensor:
    """Return ``losses`` if it is a ``[B]`` tensor of per-example losses, else raise ``ValueError``."""
    if not isinstance(losses, torch.Tensor) or losses.ndim != 1 or len(losses) == 0:
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(
            f"ENGM needs per-example losses of shape [B], got {shape}. A loss reduced with "
            "reduction='mean' or 'sum' hides each example's share. Fix: compute the loss with "
            "reduction='none', e.g. F.cross_entropy(logits, y, reduction='none')."
        )
    return losses


def require_torch_optimizer(optimizer: object) -> torch.optim.Optimizer:
    """Return ``optimizer`` or raise ``TypeError`` if it is not a ``torch.optim.Optimizer``."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}. "
            "Fix: build it on the model's parameters first, e.g. "
            "torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)."
        )
    if isinstance(optimizer, DPOptimizer):
        raise TypeError(
            f"optimizer is already an Opacus {type(optimizer).__name__}. "
            "Fix: pass the plain torch optimizer it wraps (its .original_optimizer)."
        )
    return optimizer


class NormalizingDPOptimizer(DPOptimizer):
    """An Opacus ``DPOptimizer`` whose ``max_grad_norm`` is ENGM's floor ``gamma`` in ``w_i = 1/max(n_i, gamma)``.

    The base of :class:`ENGMOptimizer` and of the cheap
    :class:`~engm_opacus.cheap.InputNormENGMOptimizer`: ``DPOptimizer`` forwards
    ``param_groups``, ``state``, ``defaults`` and ``params`` to the wrapped optimizer.
    """

    @property
    def gamma(self) -> float:
        """The normalization floor (Opacus's ``max_grad_norm``)."""
        return self.max_grad_norm

    @gamma.setter
    def gamma(self, value: float) -> None:
        self.max_grad_norm = validate_gamma(value)


class ENGMOptimizer(NormalizingDPOptimizer):
    """Example-normalized gradient descent on top of any ``torch.optim`` optimizer.

    Per step: ``n_i = ||g_i||_2`` over all parameters the optimizer trains,
    ``w_i = 1/max(n_i, gamma)``, ``p.grad = (1/N) sum_i w_i g_i``, then the wrapped
    optimizer's ``step()``.

    The divisor ``N``: by default the number of examples whose per-sample gradients
    were accumulated since the last ``zero_grad()`` (the actual batch size; with two
    ``backward()`` calls of 64 examples, ``N = 128``, so accumulation equals one call
    on the concatenated batch). This is right for adversarial training, whose
    batches are not Poisson-sampled. Pass ``expected_batch_size`` to use Opacus's
    convention ``N = expected_batch_size * accumulated_iterations`` instead.

    Non-finite per-example gradients never become a silent NaN update:
    ``on_nonfinite="raise"`` (default) raises ``FloatingPointError``;
    ``"skip"`` leaves the parameters and momentum untouched and records the skip in
    :attr:`last_step`.

    Args:
        optimizer: the wrapped ``torch.optim.Optimizer`` (``SGD`` for ENGM as published).
        gamma: the normalization floor ``gamma > 0``.
        expected_batch_size: optional fixed divisor per accumulated ``backward()``.
        on_nonfinite: ``"raise"`` or ``"skip"``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        gamma: float,
        expected_batch_size: Optional[int] = None,
        on_nonfinite: NonFinitePolicy = "raise",
    ):
        require_torch_optimizer(optimizer)
        gamma = validate_gamma(gamma)
        if expected_batch_size is not None and (
            not isinstance(expected_batch_size, int) or expected_batch_size <= 0
        ):
            raise ValueError(
                f"expected_batch_size must be a positive int or None, got {expected_batch_size!r}. "
                "Fix: leave it None to divide by the actual number of examples."
            )
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}.")
        # loss_reduction="sum" tells DPOptimizer not to rescale: ENGM's scale_grad below
        # always averages (1/N). The GradSampleModule's own loss_reduction is separate.
        super().__init__(
            optimizer,
            noise_multiplier=0.0,
            max_grad_norm=gamma,
            expected_batch_size=expected_batch_size,
            loss_reduction="sum",
        )
        self.on_nonfinite: NonFinitePolicy = on_nonfinite
        self.model_loss_reduction: Literal["mean", "sum"] = "mean"  # set by make_engm
        self.last_step: Optional[ENGMStepStats] = None
        self._accumulated_examples = 0
        self._step_norms: list[torch.Tensor] = []

    def backward(self, per_example_losses: torch.Tensor, at_output: Optional[object] = None) -> None:
        """Backpropagate ``[B]`` per-example losses so that ``step()`` sees every ``g_i``.

        With materialized per-sample gradients this is one ``backward()`` of the
        losses reduced as the ``GradSampleModule`` expects (mean or sum); the ENGM
        weighting happens in :meth:`step`. Other variants override this seam;
        ``at_output`` (the AT adapter's ``ATLossOutput``, passed by
        :func:`engm_opacus.step.train_step`) is unused here and there for variants that need it.
        """
        losses = require_per_example_losses(per_example_losses)
        (losses.mean() if self.model_loss_reduction == "mean" else losses.sum()).backward()

    def clip_and_accumulate(self) -> None:
        """Add ``sum_i w_i g_i`` over the stored per-sample gradients to ``p.summed_grad``.

        Replaces Opacus's clip factor ``min(1, C/(n_i + 1e-6))`` by the ENGM weight
        ``1/max(n_i, gamma)`` (exact: no epsilon in the denominator).
        """
        grad_samples = self.grad_samples
        norms = norms_from_grad_samples(grad_samples)
        if not bool(torch.isfinite(norms).all()):
            bad = torch.nonzero(~torch.isfinite(norms)).flatten().tolist()
            if self.on_nonfinite == "raise":
                raise FloatingPointError(
                    f"Non-finite per-example gradient norm for examples {bad[:10]} of {len(norms)}. "
                    "Fix: lower the learning rate or check the loss for log(0)/overflow; or pass "
                    "on_nonfinite='skip' to make_engm to skip such steps."
                )
        weights = engm_weights(norms, self.gamma)
        self._step_norms.append(norms.detach())
        self._accumulated_examples += len(norms)
        for p, grad_sample in zip(self.params, grad_samples):
            _check_processed_flag(p.grad_sample)
            weighted_sum = torch.einsum("i,i...->...", weights.to(grad_sample), grad_sample)
            p.summed_grad = weighted_sum if p.summed_grad is None else p.summed_grad + weighted_sum
            _mark_as_processed(p.grad_sample)

    def add_noise(self) -> None:
        """ENGM adds no noise: ``p.grad = p.summed_grad``."""
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            p.grad = p.summed_grad.view_as(p)
            _mark_as_processed(p.summed_grad)

    def scale_grad(self) -> None:
        """Divide ``p.grad`` by ``N``: actual examples, or ``expected_batch_size * accumulated_iterations``."""
        if self.expected_batch_size is None:
            divisor = self._accumulated_examples
        else:
            divisor = self.expected_batch_size * self.accumulated_iterations
        for p in self.params:
            p.grad /= divisor

    def pre_step(self, closure: Optional[Callable[[], float]] = None) -> bool:
        """Weight, average and record diagnostics; return ``False`` to skip the wrapped step."""
        ready = super().pre_step(closure)
        if (not ready and self._is_last_step_skipped) or not self._step_norms:
            return ready  # an accumulation-only step (BatchMemoryManager) or nothing to process
        norms = torch.cat(self._step_norms)
        finite = bool(torch.isfinite(norms).all())
        if finite:
            direction_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params])))
        else:  # on_nonfinite == "skip": clip_and_accumulate raises otherwise
            direction_norm = float("nan")
            for p in self.params:
                p.grad = None
        self.last_step = ENGMStepStats(
            per_example_norms=norms,
            weights=engm_weights(norms, self.gamma),
            fraction_above_gamma=float((norms > self.gamma).double().mean()),
            direction_norm=direction_norm,
            skipped=not finite,
        )
        return ready and finite

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Clear ``p.grad``, per-sample gradients and the accumulated ENGM sums."""
        if not self._is_last_step_skipped:
            self._accumulated_examples = 0
            self._step_norms = []
        super().zero_grad(set_to_none)
