"""``ENGMOptimizer``: Opacus's ``DPOptimizer`` with normalizing instead of clipping, no noise, one backward.

For the examples of the backward passes since ``zero_grad()`` (``N`` in all, each pass a mean
over its own ``B`` rows) and per-example gradients ``g_i = B * dL/dtheta^(i)``
(:mod:`engm_opacus.per_example`):

.. math::

    n_i = \\|g_i\\|_2,\\quad w_i = \\frac{1}{\\max(n_i, \\gamma)},\\quad
    d = \\frac{1}{N}\\sum_i w_i g_i

``d`` is written to ``p.grad`` and the wrapped optimizer (``torch.optim.SGD`` for ENGM as
published) steps on it, so weight decay, momentum, dampening and Nesterov are its own. Since
``w_i = (1/gamma) min(1, gamma/n_i)``, this is DP-SGD's per-sample clipping with
``max_grad_norm = gamma``, zero noise, and the update scaled by ``1/gamma``: Opacus's
``clip_and_accumulate`` / ``add_noise`` / ``scale_grad`` become :meth:`ENGMOptimizer.accumulate`
and the division by ``N``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Literal, Optional, Set, Tuple

import torch
from opacus.optimizers.optimizer import DPOptimizer
from torch import nn

from engm_opacus.functional import engm_weights, nonfinite_norms_error, validate_gamma
from engm_opacus.optim.checks import check_coverage, verify_against_grads
from engm_opacus.optim.distributed import all_reduce_sums, data_parallel_world, gather_examples
from engm_opacus.optim.input_norm import InputNormEstimator
from engm_opacus.optim.stats import ENGMStepStats
from engm_opacus.per_example import BackwardRecord, ENGMModule, LayerReduction, rule_for
from engm_opacus.per_example.rules.base import PerExampleGrads

NonFinitePolicy = Literal["raise", "skip"]

REDUCED_PRECISION = (torch.float16, torch.bfloat16)


def require_torch_optimizer(optimizer: object) -> torch.optim.Optimizer:
    """Return ``optimizer`` or raise ``TypeError`` if it is not a plain ``torch.optim.Optimizer``."""
    if isinstance(optimizer, DPOptimizer):
        raise TypeError(
            f"optimizer is already an Opacus {type(optimizer).__name__}. "
            "Fix: pass the plain torch optimizer it wraps (its .original_optimizer)."
        )
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}. Fix: build it on the "
            "model's parameters first, e.g. torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)."
        )
    return optimizer


class ENGMOptimizer(DPOptimizer):
    """Example-normalized gradient descent on top of a ``torch.optim`` optimizer.

    Use it as the wrapped optimizer: ``loss.backward(); optimizer.step(); optimizer.zero_grad()``.
    ``step()`` turns the records of :class:`~engm_opacus.per_example.ENGMModule` into ``d``.
    Opacus's ``BatchMemoryManager`` works (``signal_skip_step``: a skipped step reduces its records
    into the running sum and keeps it). ``torch.amp.GradScaler`` works: the scaler hands the scale
    to ``step()`` (``_step_supports_amp_scaling``) and an overflow skips the step.

    Args:
        optimizer: the wrapped ``torch.optim.Optimizer``.
        module: the model wrapped by :func:`~engm_opacus.make_engm`.
        gamma: the normalization floor ``gamma > 0``.
        on_nonfinite: ``"raise"`` (``FloatingPointError``) or ``"skip"`` (no update, momentum
            untouched, recorded in :attr:`last_step`) on NaN/inf per-example norms.
        estimator: the input-norm variant's estimator, or ``None`` for exact norms.
        attack_loss_reduction: input-norm variant, attack source: how the attack's loss reduces the batch.
        verify_steps: on this many first steps, check that the recorded per-example gradients
            sum to ``p.grad`` (one extra weighted-gradient computation): a parameter used outside
            its layer's forward (tied weights, ``F.linear(x, layer.weight)``) or gradients cleared
            behind ENGM's back raise instead of giving a wrong update. ``0`` turns it off.
        distributed: the model is data-parallel: all-reduce the weighted sums and example counts
            of every rank (set by :func:`~engm_opacus.make_engm` for a ``DistributedDataParallel`` model).
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        module: ENGMModule,
        gamma: float,
        on_nonfinite: NonFinitePolicy = "raise",
        estimator: Optional[InputNormEstimator] = None,
        attack_loss_reduction: Literal["mean", "sum"] = "mean",
        verify_steps: int = 1,
        distributed: bool = False,
    ):
        require_torch_optimizer(optimizer)
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}.")
        super().__init__(
            optimizer, noise_multiplier=0.0, max_grad_norm=validate_gamma(gamma), expected_batch_size=None, loss_reduction="sum"
        )
        self.module = module
        self.on_nonfinite: NonFinitePolicy = on_nonfinite
        self.estimator = estimator
        self.last_step: Optional[ENGMStepStats] = None
        self._norms: List[torch.Tensor] = []
        self._calibration_errors: List[float] = []
        self.verify_steps = verify_steps
        self.distributed = distributed
        self.attack_loss_reduction = attack_loss_reduction
        self._nonfinite_gradient = False
        self._arm_next_step()

    @property
    def gamma(self) -> float:
        """The normalization floor (Opacus's ``max_grad_norm``)."""
        return self.max_grad_norm

    @gamma.setter
    def gamma(self, value: float) -> None:
        self.max_grad_norm = validate_gamma(value)

    @torch.no_grad()
    def accumulate(self, grad_scale: float = 1.0, overflow: bool = False) -> None:
        """Add ``sum_i w_i g_i`` of every recorded backward pass to ``p.summed_grad``; keep the norms.

        On the input-norm fast path the backward already produced ``sum_i w_i grad l_i`` in ``p.grad``
        (:meth:`_fast_path_weights`), which is moved there as it is.

        Args:
            grad_scale: the loss scale of a ``GradScaler`` (records are divided by it).
            overflow: the scaler found inf/NaN: non-finite norms are expected, not an error.
        """
        records, accumulated = self.module.take_records()
        own = set(self.params)
        if self.module.row_weights is not None:
            self._accumulate_weighted_passes(records, own, grad_scale, overflow)
            return
        check_coverage(records, accumulated & own, own, self._parameter_names())
        reduce_mean = self.module.loss_reduction == "mean"
        layer_reductions: List[Tuple[LayerReduction, int]] = []
        passes: List[Tuple[Dict[nn.Module, LayerReduction], torch.Tensor, float]] = []
        for record in records:
            rows = record.batch_size()
            factor = (rows if reduce_mean else 1.0) / grad_scale
            reductions: Dict[nn.Module, LayerReduction] = {
                layer: rule_for(layer).reduction(layer, calls) for layer, calls in record.calls.items()
            }
            reductions.update({layer: PerExampleGrads(grads) for layer, grads in record.per_example.items()})
            layer_reductions.extend((reduction, rows) for reduction in reductions.values())
            norms = self._norms_of(record, reductions, factor, own)
            self._norms.append(norms)
            passes.append((reductions, norms, factor))
        for reductions, norms, factor in passes:
            if not bool(torch.isfinite(norms).all()):
                if self.on_nonfinite == "raise" and not overflow and not self.distributed:
                    raise nonfinite_norms_error(norms)
                continue
            factors = engm_weights(norms, self.gamma) * factor
            for reduction in reductions.values():
                for p, grad in reduction.weighted_grads(factors).items():
                    if p in own:
                        p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
        if self.verify_steps > 0 and records and not overflow:
            reduced_precision = any(
                call.backprops.dtype in REDUCED_PRECISION for record in records for calls in record.calls.values() for call in calls
            )
            verify_against_grads(layer_reductions, own, reduced_precision, self._parameter_names())
            self.verify_steps -= 1

    def _accumulate_weighted_passes(
        self, records: List[BackwardRecord], own: Set[nn.Parameter], grad_scale: float, overflow: bool
    ) -> None:
        """Fast path: every pass that reached the parameters had its rows scaled by ``w_i``; ``p.grad`` is the sum."""
        unweighted = [record for record in records if record.accumulated and (record.weighted_rows is None or record.unweighted)]
        if unweighted:
            raise RuntimeError(
                "A backward pass accumulated into p.grad through a forward whose rows ENGM did not weight (input-norm "
                "variant, input_grad_source='attack'): a forward on an input that requires grad counts as an attack's, "
                "and its backward is not weighted. The ENGM update would be wrong. Fix: detach the training inputs "
                "(x_adv.detach(), also in a TRADES/MART loss), clear gradients after a loss.backward() attack with "
                "optimizer.zero_grad(), or use input_grad_source='backward'."
            )
        for record in records:
            if record.weighted_rows is not None:
                self._norms.append(record.estimated_norms)
                finite = bool(torch.isfinite(record.estimated_norms).all())
                if not finite and self.on_nonfinite == "raise" and not overflow and not self.distributed:
                    raise nonfinite_norms_error(record.estimated_norms)
        for p in own:
            if p.grad is not None:
                contribution = p.grad.detach() / grad_scale
                p.grad = None  # moved: a later backward before zero_grad() adds only its own passes
                if not overflow and not bool(torch.isfinite(contribution).all()):
                    if self.on_nonfinite == "raise" and not self.distributed:
                        raise FloatingPointError(
                            "Non-finite gradient in the input-norm fast path's weighted backward. Fix: lower the learning "
                            "rate or check the loss for log(0)/overflow; or pass on_nonfinite='skip' to make_engm."
                        )
                    self._nonfinite_gradient = True
                p.summed_grad = contribution if p.summed_grad is None else p.summed_grad + contribution

    def _fast_path_weights(self, attack_norms: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(w_i * B, s m_i)`` (``w_i`` alone for a sum-reduced loss) for a training forward's ``B`` rows:
        its output gradient scaled by them makes ``p.grad = sum_i w_i grad l_i``."""
        rows = len(attack_norms) if self.module.loss_reduction == "mean" else 1
        estimates = self.estimator.estimate(self.estimator.attack_norms(attack_norms, self._attack_factor(len(attack_norms))))
        return engm_weights(estimates, self.gamma) * rows, estimates

    def _attack_factor(self, rows: int) -> float:
        """``B`` for a mean-reduced attack loss, ``1`` for a summed one: ``m_i`` is then each example's own input-gradient
        norm, whatever the batch size (an epoch's last batch, uneven data-parallel shards)."""
        return float(rows) if self.attack_loss_reduction == "mean" else 1.0

    def _arm_next_step(self) -> None:
        """Choose how the coming step's backward passes are handled: recorded (exact norms, calibration) or the
        input-norm fast path (weights fixed at the training forward from the attack's last input gradient)."""
        estimator = self.estimator
        fast = estimator is not None and self.module.input_grad_source == "attack" and not estimator.calibrating
        self.module.recording = not fast
        self.module.row_weights = self._fast_path_weights if fast else None

    def _norms_of(
        self, record: BackwardRecord, reductions: Dict[nn.Module, LayerReduction], factor: float, own: Set[nn.Parameter]
    ) -> torch.Tensor:
        """``[B]`` norms of one backward pass: exact, or the input-norm estimate (exact when calibrating)."""
        estimator = self.estimator
        input_norms = None
        if estimator is not None:
            if self.module.input_grad_source == "attack":
                input_norms = estimator.attack_norms(record.attack_input_norms, self._attack_factor(record.batch_size()))
            else:
                input_norms = estimator.input_norms(record.input_grads, factor)
        if estimator is not None and not estimator.calibrating:
            return estimator.estimate(input_norms)
        squared: Optional[torch.Tensor] = None
        for calls in record.calls.values():
            for call in calls:
                call.check_unchanged()
        for reduction in reductions.values():
            for p, values in reduction.squared_norms().items():
                if p in own:
                    squared = values if squared is None else squared + values.to(squared)
        exact = torch.zeros(record.batch_size()) if squared is None else factor * squared.sqrt()
        if estimator is not None:
            pairs = (exact.double(), input_norms.to(exact.device))
            estimator.calibrate(*(gather_examples(pairs) if self.distributed else pairs))
            self._calibration_errors.append(estimator.last_calibration_error)
        return exact

    def _parameter_names(self) -> Dict[nn.Parameter, str]:
        """Each parameter's name in the model, for error messages."""
        return {p: name for name, p in self.module._module.named_parameters()}

    def pre_step(self, closure: Optional[Callable[[], float]] = None) -> bool:
        """Accumulate the records; unless the step is skipped, set ``p.grad = d``; return whether to step.

        In a data-parallel job (``make_engm`` on a ``DistributedDataParallel`` model) the sums, the
        example count and the skip decision are all-reduced first (:mod:`engm_opacus.optim.distributed`).
        """
        if not self.module.hooks_enabled:
            raise RuntimeError(
                "The model's ENGM hooks are off (to_standard_module() or disable_hooks() was called), so this "
                "step would silently be plain SGD. Fix: keep training the model make_engm returned, or build a plain "
                "torch optimizer for the unwrapped model."
            )
        if not self.distributed and data_parallel_world() > 1:
            raise RuntimeError(
                f"torch.distributed runs {data_parallel_world()} processes, but this ENGM optimizer was made for one: "
                "DistributedDataParallel wrapped around make_engm's model (or no wrapper at all) would average "
                "p.grad and ENGM would overwrite it with each rank's local direction. Fix: "
                "model, optimizer = make_engm(DistributedDataParallel(model), optimizer, gamma=...)."
            )
        grad_scale, overflow = self._amp_state()
        self.accumulate(grad_scale, overflow)
        self.module.forget_attack_gradient()
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            self._arm_next_step()
            return False
        self._is_last_step_skipped = False
        local = torch.cat([n.to(self._norms[0].device) for n in self._norms]) if self._norms else torch.zeros(0)
        nonfinite = not bool(torch.isfinite(local).all()) or self._nonfinite_gradient
        examples = len(local)
        if self.distributed:
            examples, (overflow, nonfinite) = all_reduce_sums(self.params, examples, (overflow, nonfinite))
            if nonfinite and self.on_nonfinite == "raise" and not overflow:
                raise nonfinite_norms_error(local)
        if examples == 0:
            return True  # no backward reached the parameters: the wrapped optimizer sees p.grad as it is
        skipped = overflow or nonfinite
        if not skipped:
            for p in self.params:
                if p.summed_grad is not None:
                    p.grad = (p.summed_grad / examples).view_as(p).to(p.dtype)
        self._nonfinite_gradient = False
        self.last_step = self._stats(local, skipped)
        if self.estimator is not None:
            self.estimator.steps += 1
        self._arm_next_step()
        return not skipped

    def _amp_state(self) -> Tuple[float, bool]:
        """``(scale, overflow)`` handed over by ``torch.amp.GradScaler.step`` (``(1.0, False)`` without one)."""
        if not hasattr(self, "found_inf"):
            return 1.0, False
        if getattr(self, "grad_scale", None) is None:
            del self.found_inf  # GradScaler.step does not get to remove it when step() raises
            raise RuntimeError(
                "GradScaler.unscale_(optimizer) was called before step(): ENGM needs the scale to unscale its "
                "per-example records, and clipping p.grad has no effect on ENGM's direction. Fix: remove "
                "scaler.unscale_(optimizer) (and clip_grad_norm_) and call scaler.step(optimizer) directly."
            )
        return float(self.grad_scale), bool(float(self.found_inf) > 0)

    def _stats(self, norms: torch.Tensor, skipped: bool) -> ENGMStepStats:
        direction_norm = float("nan")
        if not skipped:
            grads = [p.grad.reshape(-1) for p in self.params if p.grad is not None]
            direction_norm = float(torch.linalg.vector_norm(torch.cat(grads))) if grads else 0.0
        errors = [e for e in self._calibration_errors if e is not None]
        return ENGMStepStats(
            per_example_norms=norms.detach(),
            weights=engm_weights(norms, self.gamma).detach(),
            fraction_above_gamma=float((norms > self.gamma).double().mean()),
            direction_norm=direction_norm,
            skipped=skipped,
            scale=None if self.estimator is None else self.estimator.scale,
            calibrated=bool(self._calibration_errors),
            calibration_error=errors[-1] if errors else None,
            gamma=self.gamma,
        )

    def state_dict(self) -> Dict[str, Any]:
        """The wrapped optimizer's ``state_dict`` plus ``"engm"``: the input-norm scale and step count, so that a resumed
        run continues exactly."""
        state = super().state_dict()
        state["engm"] = {"estimator": None if self.estimator is None else self.estimator.state_dict()}
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load :meth:`state_dict` (a plain ``torch.optim`` state dict loads too, leaving ENGM's own state as it is).

        A fixed ``input_norm_scale`` given to ``make_engm`` is kept (only the step count is restored then)."""
        engm = state_dict.get("engm")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "engm"})
        if engm is not None and self.estimator is not None and engm["estimator"] is not None:
            self.estimator.load_state_dict(engm["estimator"])
        self._arm_next_step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``p.grad`` and the module's records; the running sums too unless the last step was skipped."""
        if not self._is_last_step_skipped:
            self._norms = []
            self._calibration_errors = []
        self.module.clear_records()
        super().zero_grad(set_to_none)
