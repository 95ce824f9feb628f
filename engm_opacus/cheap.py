"""The cheap ENGM variant: per-example norms estimated from input-gradient norms.

No per-sample parameter gradients are materialized, so it runs on any model,
BatchNorm included, at (nearly) the cost of plain adversarial training. Per step,
for the ``B`` per-example losses ``l_i`` at the adversarial inputs ``x_i``:

.. math::

    \\hat n_i = s \\, \\|\\nabla_{x_i} l\\|_2, \\qquad
    w_i = \\frac{1}{\\max(\\hat n_i, \\gamma)}, \\qquad
    d = \\nabla_\\theta \\frac{1}{B} \\sum_i \\operatorname{sg}(w_i)\\, l_i
      = \\frac{1}{B} \\sum_i w_i \\, g_i

(``sg`` = stop-gradient: the weights are detached, so the one weighted backward
gives exactly ``(1/B) sum_i w_i g_i`` for those weights). ``d`` goes to ``p.grad``
and the wrapped ``torch.optim`` optimizer steps on it (SGD semantics for weight
decay, momentum, Nesterov). ``w_i`` is :func:`engm_opacus.weights.engm_weights`.

**Input-gradient sources.**

* ``"recompute"``: one backward to the input only,
  ``torch.autograd.grad(sum_i l_i, x_adv, retain_graph=True)``, on the graph of the
  final forward (``x_adv`` must be a leaf that requires grad: adapters do this when
  asked with ``track_input_grad=True``, which :mod:`engm_opacus.step` does because
  :attr:`InputNormENGMOptimizer.needs_input_grad` is ``True``). Row ``i`` is
  ``grad_{x_i} l_i`` because ``l_j`` does not depend on ``x_i`` for ``j != i`` (but see
  BatchNorm below). For losses that also use the clean input (TRADES, MART) it is the
  gradient w.r.t. ``x_adv`` only: the clean ``x`` is not tracked.
* ``"attack"``: the input gradient the attack already computed at its last PGD step
  (``ATLossOutput.attack_input_grad``), free when the attack loss is the training loss
  (PGD-AT). It is taken at the last PGD iterate *before* the final sign step, not at
  the returned ``x_adv``. Adapters whose attack maximizes another loss (TRADES, MART:
  KL) give ``None``; this variant then raises and names ``"recompute"`` as the fix.

**BatchNorm in training mode.** The batch statistics make
``l_j`` depend on every ``x_i``. Both sources then give row ``i`` of
``grad_x sum_j l_j`` (BN's backward centers the upstream gradient over the batch),
which is also what PGD ascends in the attack. We use it as is, as an estimate:
the scale ``s`` is fitted to exact norms and the correlation between estimate and
exact norm is reported, so how well it tracks is measured, not assumed.

**Scale** ``s``. Either fixed (``scale=1.0`` by default, no calibration), or
calibrated every ``K`` steps on the current batch against exact per-example norms
``n_i = ||grad_theta l_i||_2`` (:func:`exact_per_example_norms`) of its first ``M``
examples (``calibration_examples``, default 32): the ratio
``r = sum_{i<M} n_i / sum_{i<M} ||grad_{x_i} l||``, and ``s <- r`` at the first
calibration, then ``s <- m s + (1 - m) r`` (an exponential running average with
momentum ``m``). The exact norms are taken on the same graph as the training loss
(``torch.autograd.grad(..., is_grads_batched=True)``), so ``g_i`` is the total
derivative of ``l_i`` -- with BatchNorm in training mode it includes the path
through the batch statistics, and ``sum_i g_i`` is exactly the batch gradient:
the definition under which the cheap update is ``(1/B) sum_i w_i g_i``. (Exact
ENGM on BatchNorm models, :mod:`engm_opacus.batchnorm`, holds the batch statistics
constant in its norm pass instead; without BatchNorm the two definitions coincide.) This
needs no model copy, no functional re-forward and no loss function, so it
works for every adapter (TRADES included) and for BatchNorm. Its price: each of the
``M`` vector-Jacobian products backpropagates through the whole batch's graph, so a
calibration costs about ``M`` backward passes, once every ``K`` steps (hence ``M < B``:
the ratio of 32 examples estimates a global scale well, and the correlation is averaged
over calibrations).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple, Union

import torch
from opacus.grad_sample import GradSampleModule
from torch import nn
from torch.optim import Optimizer

from engm_opacus.losses.base import ATLossOutput
from engm_opacus.optimizer import (
    ENGMStepStats,
    NonFinitePolicy,
    NormalizingDPOptimizer,
    require_per_example_losses,
    require_torch_optimizer,
)
from engm_opacus.weights import engm_weights, validate_gamma

InputGradSource = Literal["recompute", "attack"]
INPUT_GRAD_SOURCES: Tuple[str, ...] = ("recompute", "attack")
ScaleHook = Callable[[torch.Tensor], Union[float, torch.Tensor]]
"""``scale(input_norms) -> s``: a float or a ``[B]`` tensor of per-example scales (a test hook)."""


@dataclass(frozen=True)
class InputNormStepStats(ENGMStepStats):
    """:class:`~engm_opacus.optimizer.ENGMStepStats` of a cheap step, plus what the estimate used.

    ``per_example_norms`` are the estimates ``s * ||grad_x l_i||``.

    Attributes:
        input_grad_norms: ``[B]`` input-gradient norms ``||grad_{x_i} l||_2``.
        scale: the global ``s`` used (``nan`` when a per-example ``scale`` hook was used).
        exact_norms: ``[M]`` exact ``||grad_theta l_i||_2`` of the first ``M`` examples on calibration
            steps, else ``None``.
        pearson: Pearson correlation of ``input_grad_norms[:M]`` and ``exact_norms`` on calibration
            steps, else ``None``.
    """

    input_grad_norms: torch.Tensor
    scale: float
    exact_norms: Optional[torch.Tensor]
    pearson: Optional[float]


@dataclass(frozen=True)
class CalibrationRecord:
    """One calibration of ``s``: at optimizer step ``step``, batch ratio, new ``s``, and correlation."""

    step: int
    ratio: float
    scale: float
    pearson: float


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation ``cov(x, y) / (std(x) std(y))`` of two ``[N]`` tensors; ``nan`` if one is constant."""
    x = x.detach().double().flatten()
    y = y.detach().double().flatten()
    if x.shape != y.shape or len(x) < 2:
        raise ValueError(f"pearson needs two [N] tensors with N >= 2, got {tuple(x.shape)} and {tuple(y.shape)}.")
    xc, yc = x - x.mean(), y - y.mean()
    denominator = float(xc.norm() * yc.norm())
    return float((xc * yc).sum()) / denominator if denominator > 0 else float("nan")


def exact_per_example_norms(
    per_example_losses: torch.Tensor,
    params: Sequence[torch.Tensor],
    chunk_size: int = 32,
    rows: Optional[int] = None,
) -> torch.Tensor:
    """``n_i = ||grad_theta l_i||_2`` for ``i < rows`` (all by default), from the graph of ``per_example_losses``.

    Runs batched vector-Jacobian products (``is_grads_batched=True``) with rows of the
    identity, ``chunk_size`` rows at a time (memory ``chunk_size x`` the parameters), and
    keeps the graph (``retain_graph=True``) for the training backward. Each row
    backpropagates through the whole batch, so the cost is about ``rows`` backward passes.

    Args:
        per_example_losses: ``[B]`` losses whose graph reaches ``params``.
        params: the trained parameters.
        chunk_size: examples per batched backward.
        rows: compute the first ``rows`` norms only.
    """
    losses = require_per_example_losses(per_example_losses)
    params = [p for p in params if p.requires_grad]
    count = len(losses) if rows is None else min(rows, len(losses))
    eye = torch.eye(len(losses), dtype=losses.dtype, device=losses.device)[:count]
    pieces = []
    for start in range(0, count, chunk_size):
        rows_chunk = eye[start : start + chunk_size]
        grads = torch.autograd.grad(
            losses, params, grad_outputs=rows_chunk, is_grads_batched=True, retain_graph=True, allow_unused=True
        )
        squared = torch.zeros(len(rows_chunk), dtype=losses.dtype, device=losses.device)
        for g in grads:
            if g is not None:
                squared = squared + g.reshape(len(rows_chunk), -1).pow(2).sum(dim=1).to(squared)
        pieces.append(squared)
    return torch.cat(pieces).sqrt()


class ScaleCalibrator:
    """Running estimate of ``s`` in ``||grad_theta l_i|| ~= s ||grad_x l_i||``.

    Calibrates at optimizer steps ``0, K, 2K, ...`` on the first ``M`` examples of the batch:
    ``r = sum_i n_i / sum_i m_i`` (``n`` exact, ``m`` input-gradient norms), ``s = r`` the
    first time, then ``s = momentum * s + (1 - momentum) * r``.

    Args:
        every: ``K >= 1``.
        momentum: ``0 <= momentum < 1``.
        examples: ``M >= 2``, examples per calibration (all of a smaller batch).
    """

    def __init__(self, every: int, momentum: float = 0.9, examples: int = 32):
        if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
            raise ValueError(
                f"calibrate_every must be a positive int K (calibrate s every K steps), got {every!r}. "
                "Fix: pass e.g. calibrate_every=50, or calibrate_every=None with a fixed scale."
            )
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(
                f"calibration_momentum must be in [0, 1), got {momentum!r}. Fix: pass e.g. 0.9 "
                "(0 uses only the latest batch's ratio)."
            )
        if isinstance(examples, bool) or not isinstance(examples, int) or examples < 2:
            raise ValueError(
                f"calibration_examples must be an int >= 2 (a ratio and a correlation need two examples), "
                f"got {examples!r}. Fix: pass e.g. calibration_examples=32."
            )
        self.every = every
        self.momentum = float(momentum)
        self.examples = examples
        self.scale: Optional[float] = None
        self.records: List[CalibrationRecord] = []

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) calibrates."""
        return step % self.every == 0

    def update(self, step: int, input_norms: torch.Tensor, exact_norms: torch.Tensor) -> CalibrationRecord:
        """Fold one batch's ratio into ``s`` and record it; a batch with all-zero input norms leaves ``s``."""
        total_input = float(input_norms.sum())
        ratio = float(exact_norms.sum()) / total_input if total_input > 0 else float("nan")
        if ratio == ratio:  # not nan
            self.scale = ratio if self.scale is None else self.momentum * self.scale + (1 - self.momentum) * ratio
        record = CalibrationRecord(
            step=step,
            ratio=ratio,
            scale=float("nan") if self.scale is None else self.scale,
            pearson=pearson(input_norms, exact_norms) if len(input_norms) > 1 else float("nan"),
        )
        self.records.append(record)
        return record

    @property
    def running_pearson(self) -> float:
        """Mean of the per-calibration Pearson correlations so far (``nan`` before any)."""
        values = [r.pearson for r in self.records if r.pearson == r.pearson]
        return sum(values) / len(values) if values else float("nan")

    def state_dict(self) -> Dict[str, Any]:
        """``s`` and the calibration history."""
        return {"scale": self.scale, "records": [vars(r).copy() for r in self.records]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.scale = state["scale"]
        self.records = [CalibrationRecord(**r) for r in state["records"]]


def validate_source(source: str) -> InputGradSource:
    """Return ``source`` if it is ``"recompute"`` or ``"attack"``, else raise ``ValueError``."""
    if source not in INPUT_GRAD_SOURCES:
        raise ValueError(
            f"Unknown input_norm_source {source!r}. Fix: use 'recompute' (one extra backward to the "
            "input, any AT loss) or 'attack' (the last PGD step's input gradient, free for PGD-AT)."
        )
    return source  # type: ignore[return-value]


class InputNormENGMOptimizer(NormalizingDPOptimizer):
    """Cheap ENGM: ``w_i = 1/max(s ||grad_x l_i||, gamma)``, one weighted backward, then the wrapped step.

    Use its :meth:`backward` seam instead of ``loss.backward()``::

        out = adapter(model, x, y)                    # ATLossOutput, per-example losses
        optimizer.backward(out.per_example, at_output=out)
        optimizer.step(); optimizer.zero_grad()

    or, in a hand-written loop with ``source="recompute"``::

        x_adv = attack(model, x, y).requires_grad_()
        losses = F.cross_entropy(model(x_adv), y, reduction="none")
        optimizer.backward(losses, inputs=x_adv)

    Several :meth:`backward` calls before one :meth:`step` accumulate:
    ``d = (1/N) sum_i w_i g_i`` over all ``N`` examples (each ``w_i`` from its own call).

    Args:
        optimizer: the wrapped ``torch.optim.Optimizer``.
        gamma: normalization floor ``gamma > 0``.
        source: ``"recompute"`` or ``"attack"`` (see the module docstring).
        calibrate_every: ``K``: calibrate ``s`` on the current batch at steps ``0, K, 2K, ...``;
            ``None`` for a fixed scale.
        scale: the fixed ``s`` (float, default ``1.0``) or a hook ``scale(input_norms)`` returning a
            float or ``[B]`` per-example scales; only without calibration.
        calibration_momentum: momentum of the running average of ``s``.
        calibration_examples: ``M``, examples of the batch whose exact norms a calibration computes.
        on_nonfinite: ``"raise"`` (``FloatingPointError``) or ``"skip"`` the step when an input-gradient
            norm is not finite.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        gamma: float,
        source: InputGradSource = "recompute",
        calibrate_every: Optional[int] = None,
        scale: Union[None, float, ScaleHook] = None,
        calibration_momentum: float = 0.9,
        calibration_examples: int = 32,
        on_nonfinite: NonFinitePolicy = "raise",
    ):
        require_torch_optimizer(optimizer)
        # DPOptimizer forwards param_groups/state/defaults/params to the wrapped optimizer;
        # loss_reduction="sum": this class divides by the actual number of examples itself.
        super().__init__(
            optimizer, noise_multiplier=0.0, max_grad_norm=validate_gamma(gamma),
            expected_batch_size=None, loss_reduction="sum",
        )
        self.source: InputGradSource = validate_source(source)
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}.")
        self.on_nonfinite: NonFinitePolicy = on_nonfinite
        if calibrate_every is not None and scale is not None:
            raise ValueError(
                "Both scale and calibrate_every were given. Fix: either fix s (scale=..., "
                "calibrate_every=None) or calibrate it (calibrate_every=K, scale=None)."
            )
        self.calibrator = None if calibrate_every is None else ScaleCalibrator(
            calibrate_every, calibration_momentum, calibration_examples
        )
        self._scale: Union[float, ScaleHook] = 1.0 if scale is None else scale
        if not callable(self._scale):
            self._scale = float(self._scale)
            if not self._scale > 0 or self._scale == float("inf"):
                raise ValueError(f"scale must be a positive finite float, got {scale!r}. Fix: pass e.g. scale=1.0.")
        self.last_step: Optional[InputNormStepStats] = None
        self.steps_taken = 0
        self._examples = 0
        self._pending: List[InputNormStepStats] = []

    def __repr__(self) -> str:
        return f"InputNormENGMOptimizer(gamma={self.gamma}, source={self.source!r}, {self.original_optimizer!r})"

    # -- ENGM ---------------------------------------------------------------------------
    @property
    def needs_input_grad(self) -> bool:
        """``True`` for ``source="recompute"``: the final forward must be on a leaf ``x_adv`` requiring grad."""
        return self.source == "recompute"

    @property
    def scale(self) -> float:
        """The current global ``s`` (``nan`` with a per-example hook or before the first calibration)."""
        if self.calibrator is not None:
            return float("nan") if self.calibrator.scale is None else self.calibrator.scale
        return float("nan") if callable(self._scale) else float(self._scale)


    def input_grad(
        self,
        per_example_losses: torch.Tensor,
        at_output: Optional[ATLossOutput] = None,
        inputs: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``[B, ...]`` input gradients from the configured source (no parameter gradients are touched)."""
        if self.source == "attack":
            grad = None if at_output is None else at_output.attack_input_grad
            if grad is None:
                raise ValueError(
                    "input_norm_source='attack' needs the input gradient of the training loss from the "
                    "attack's last step, but none was given (ATLossOutput.attack_input_grad is None: the "
                    "AT loss's attack maximizes another loss, as in TRADES and MART, or no at_output was "
                    "passed). Fix: use input_norm_source='recompute', or pass at_output from a PGD-AT adapter."
                )
            return grad.detach()
        x = inputs if inputs is not None else (None if at_output is None else at_output.x_adv)
        if x is None or not x.requires_grad:
            raise ValueError(
                "input_norm_source='recompute' needs the final forward to start from a leaf input that "
                "requires grad, but the given input does not. Fix: call the AT adapter with "
                "track_input_grad=True (engm_opacus.step does so when optimizer.needs_input_grad), or in "
                "your own loop do x_adv.requires_grad_() before the final forward and pass inputs=x_adv."
            )
        (grad,) = torch.autograd.grad(per_example_losses.sum(), x, retain_graph=True)
        return grad

    def _estimate(
        self, input_norms: torch.Tensor, losses: torch.Tensor
    ) -> Tuple[torch.Tensor, float, Optional[torch.Tensor], Optional[float]]:
        """``(estimated norms, global s, exact norms or None, pearson or None)`` for this batch."""
        if self.calibrator is not None:
            exact = None
            record = None
            if self.calibrator.due(self.steps_taken) and not self._pending:
                count = min(self.calibrator.examples, len(losses))
                exact = exact_per_example_norms(losses, self.params, rows=count).detach()
                record = self.calibrator.update(self.steps_taken, input_norms[:count], exact)
            s = self.calibrator.scale if self.calibrator.scale is not None else 1.0
            return s * input_norms, s, exact, None if record is None else record.pearson
        if callable(self._scale):
            per_example = torch.as_tensor(self._scale(input_norms), dtype=input_norms.dtype, device=input_norms.device)
            return per_example * input_norms, float("nan"), None, None
        return self._scale * input_norms, float(self._scale), None, None

    def backward(
        self,
        per_example_losses: torch.Tensor,
        at_output: Optional[ATLossOutput] = None,
        *,
        inputs: Optional[torch.Tensor] = None,
    ) -> None:
        """Estimate ``n_i``, weight, and backpropagate ``sum_i w_i l_i`` (``w_i`` detached).

        Args:
            per_example_losses: ``[B]`` losses ``l_i``.
            at_output: the adapter's output (``x_adv`` for ``"recompute"``,
                ``attack_input_grad`` for ``"attack"``).
            inputs: for ``"recompute"`` without an adapter: the leaf input of the final forward.

        Raises:
            ValueError: not per-example losses, or the source's input gradient is unavailable.
            FloatingPointError: non-finite input-gradient norm with ``on_nonfinite="raise"``.
        """
        losses = require_per_example_losses(per_example_losses)
        grad = self.input_grad(losses, at_output, inputs)
        if grad.shape[0] != len(losses):
            raise ValueError(
                f"Input gradient has batch size {grad.shape[0]} but there are {len(losses)} losses. "
                "Fix: pass the at_output of the same adapter call as the losses."
            )
        input_norms = grad.reshape(len(grad), -1).norm(dim=1).to(losses.dtype)
        finite = bool(torch.isfinite(input_norms).all())
        if not finite and self.on_nonfinite == "raise":
            bad = torch.nonzero(~torch.isfinite(input_norms)).flatten().tolist()
            raise FloatingPointError(
                f"Non-finite input-gradient norm for examples {bad[:10]} of {len(input_norms)}. "
                "Fix: lower the learning rate or check the loss for log(0)/overflow; or pass "
                "on_nonfinite='skip' to make_engm to skip such steps."
            )
        if finite:
            estimates, s, exact, corr = self._estimate(input_norms, losses)
        else:
            estimates, s, exact, corr = input_norms, self.scale, None, None
        weights = engm_weights(estimates, self.gamma).detach()
        if finite:
            (weights * losses).sum().backward()
        self._examples += len(losses)
        self._pending.append(
            InputNormStepStats(
                per_example_norms=estimates.detach(),
                weights=weights,
                fraction_above_gamma=float((estimates > self.gamma).double().mean()),
                direction_norm=float("nan"),
                skipped=not finite,
                input_grad_norms=input_norms.detach(),
                scale=s,
                exact_norms=exact,
                pearson=corr,
            )
        )

    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Average the accumulated ``sum_i w_i g_i`` over the ``N`` examples and step the wrapped optimizer.

        Returns ``closure()``'s value if a closure is given (it must call :meth:`backward`),
        else ``None``. Skips (parameters and momentum untouched) when a non-finite norm was
        seen with ``on_nonfinite="skip"``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._pending:
            raise RuntimeError(
                "InputNormENGMOptimizer.step() was called without optimizer.backward(per_example_losses, ...). "
                "Fix: replace loss.backward() by optimizer.backward(losses, at_output=out) (or inputs=x_adv)."
            )
        skipped = any(stats.skipped for stats in self._pending)
        params = self.params
        if skipped:
            for p in params:
                p.grad = None
            direction_norm = float("nan")
        else:
            for p in params:
                if p.grad is not None:
                    p.grad /= self._examples
            grads = [p.grad.norm() for p in params if p.grad is not None]
            direction_norm = float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0
        self.last_step = self._merged_stats(direction_norm, skipped)
        if not skipped:
            self.original_optimizer.step()
        self.steps_taken += 1
        self._examples = 0
        self._pending = []
        return loss

    def _merged_stats(self, direction_norm: float, skipped: bool) -> InputNormStepStats:
        pending = self._pending
        first = pending[0]
        estimates = torch.cat([s.per_example_norms for s in pending])
        exact = [s.exact_norms for s in pending if s.exact_norms is not None]
        return InputNormStepStats(
            per_example_norms=estimates,
            weights=torch.cat([s.weights for s in pending]),
            fraction_above_gamma=float((estimates > self.gamma).double().mean()),
            direction_norm=direction_norm,
            skipped=skipped,
            input_grad_norms=torch.cat([s.input_grad_norms for s in pending]),
            scale=first.scale,
            exact_norms=exact[0] if exact else None,
            pearson=first.pearson,
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear parameter gradients and any un-stepped accumulation."""
        self._examples = 0
        self._pending = []
        self.original_optimizer.zero_grad(set_to_none)

    @property
    def running_pearson(self) -> float:
        """Mean Pearson correlation of input- and parameter-gradient norms over all calibrations (``nan`` if none)."""
        return float("nan") if self.calibrator is None else self.calibrator.running_pearson

    def state_dict(self) -> Dict[str, Any]:
        """The wrapped optimizer's state dict plus ``"input_norm_engm"`` (step count, ``s``, calibrations)."""
        state = self.original_optimizer.state_dict()
        state["input_norm_engm"] = {
            "steps_taken": self.steps_taken,
            "calibrator": None if self.calibrator is None else self.calibrator.state_dict(),
        }
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        state = dict(state_dict)
        extra = state.pop("input_norm_engm", None)
        self.original_optimizer.load_state_dict(state)
        if extra is not None:
            self.steps_taken = extra["steps_taken"]
            if self.calibrator is not None and extra["calibrator"] is not None:
                self.calibrator.load_state_dict(extra["calibrator"])


def make_input_norm_engm(
    model: nn.Module,
    optimizer: Optimizer,
    *,
    gamma: float,
    source: InputGradSource = "recompute",
    calibrate_every: Optional[int] = None,
    scale: Union[None, float, ScaleHook] = None,
    calibration_momentum: float = 0.9,
    calibration_examples: int = 32,
    on_nonfinite: NonFinitePolicy = "raise",
) -> Tuple[nn.Module, InputNormENGMOptimizer]:
    """``(model, InputNormENGMOptimizer)``: the model unchanged (no per-sample machinery, BatchNorm fine).

    Called by :func:`engm_opacus.wrap.make_engm` with ``variant="input-norm"``; the arguments are
    those of :class:`InputNormENGMOptimizer`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if isinstance(model, GradSampleModule):
        raise ValueError(
            "model is a GradSampleModule, which variant='input-norm' does not need (it computes no "
            "per-sample gradients). Fix: pass the plain nn.Module (its ._module)."
        )
    cheap = InputNormENGMOptimizer(
        optimizer,
        gamma=gamma,
        source=source,
        calibrate_every=calibrate_every,
        scale=scale,
        calibration_momentum=calibration_momentum,
        calibration_examples=calibration_examples,
        on_nonfinite=on_nonfinite,
    )
    return model, cheap
