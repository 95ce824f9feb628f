"""Gradient diagnostics behind ENGM and its input-norm variant: natural training (NT) vs PGD-AT, same model and data.

Both regimes start from the same initialization, see the same batches in the same order
and are trained by the same momentum SGD (MSGD); only the training loss differs
(``CE(f(x), y)`` vs ``CE(f(x_adv), y)`` with PGD ``x_adv``). Before training and after
every epoch, on a fixed probe set of ``P`` training examples, each regime's own per-example
loss ``l_i`` gives (``g_i = grad_theta l_i``, exact, model without BatchNorm):

* mean per-example gradient norm ``(1/P) sum_i ||g_i||``;
* gradient variance: the trace of the per-example covariance
  ``tr C = (1/P) sum_i ||g_i - g_bar||^2 = (1/P) sum_i ||g_i||^2 - ||g_bar||^2``,
  and the variance of a mini-batch mean of ``B`` examples drawn with replacement, ``tr C / B``;
* Pearson and Spearman correlation between ``||g_i||`` and ``||grad_x l_i||`` (at ``x_adv``
  for AT): how well the input-norm variant's estimate ``n_i ~= s ||grad_x l_i||``
  (:class:`~engm_opacus.optim.InputNormEstimator`) can track the exact norms;
* the ENGM weights ``w_i = 1/max(||g_i||, gamma)`` for a given ``gamma``.

The exact ``||g_i||`` and ``w_i`` are what exact ENGM computes: each measurement wraps a copy of
the model with :func:`~engm_opacus.make_engm` (``lr=0``, so its step changes nothing) and reads
``optimizer.last_step`` after one ordinary ``loss.backward()`` per probe batch.

Results: ``summary.csv`` (one row per regime and measurement), ``per_example.csv`` (norms
and weights of every probe example), ``ratios.csv`` (AT/NT), PNG plots
(:mod:`engm_opacus.experiments.diagnostics_report`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from engm_opacus.at.attacks import pgd_linf, validate_threat_model
from engm_opacus.experiments.diagnostics_report import plot_all
from engm_opacus.functional import validate_gamma
from engm_opacus.training.data import load_digits_splits, make_loader
from engm_opacus.training.extras import require
from engm_opacus.training.logs import write_csv
from engm_opacus.training.models import small_cnn
from engm_opacus.wrap import make_engm

REGIMES: Tuple[str, ...] = ("NT", "AT")
Attack = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""``attack(model, x, y) -> x_adv`` (e.g. :func:`~engm_opacus.at.attacks.pgd_linf` with its options bound)."""


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson's correlation ``cov(x, y) / (std(x) std(y))`` of two ``[N]`` tensors, in float64."""
    x = x.detach().double().flatten()
    y = y.detach().double().flatten()
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks ``1..N`` of ``values``, ties sharing their average rank (as Spearman's rho needs)."""
    _, inverse, counts = torch.unique(values.detach().double(), return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    return ((ends - counts + 1 + ends) / 2)[inverse]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation: Pearson correlation of the average ranks."""
    return pearson(average_ranks(x.flatten()), average_ranks(y.flatten()))


@dataclass(frozen=True)
class GradientStats:
    """Per-example gradient statistics of one loss on one probe set.

    Attributes:
        param_norms: ``[P]`` ``||g_i||_2`` (``optimizer.last_step.per_example_norms`` of exact ENGM).
        input_norms: ``[P]`` ``||grad_x l_i||_2``.
        weights: ``[P]`` ENGM weights ``w_i = 1/max(||g_i||, gamma)`` (``optimizer.last_step.weights``).
        mean_grad_norm: ``(1/P) sum_i ||g_i||``.
        trace_covariance: ``(1/P) sum_i ||g_i - g_bar||^2``.
        mean_loss: ``(1/P) sum_i l_i``.
    """

    param_norms: torch.Tensor
    input_norms: torch.Tensor
    weights: torch.Tensor
    mean_grad_norm: float
    trace_covariance: float
    mean_loss: float

    def batch_mean_variance(self, batch_size: int) -> float:
        """``E||mean of B g_i - g_bar||^2 = tr C / B`` (examples drawn with replacement)."""
        return self.trace_covariance / batch_size


def regime_input(model: nn.Module, x: torch.Tensor, y: torch.Tensor, regime: str, attack: Attack) -> torch.Tensor:
    """The input the regime's loss is computed at: ``x`` for ``"NT"``, ``attack(model, x, y)`` for ``"AT"``."""
    if regime == "NT":
        return x
    if regime == "AT":
        return attack(model, x, y)
    raise ValueError(f"Unknown regime {regime!r}. Fix: use one of {', '.join(REGIMES)}.")


def gradient_stats(
    model: nn.Module, batches: Sequence[Tuple[torch.Tensor, torch.Tensor]], regime: str, attack: Attack, gamma: float = 1.0
) -> GradientStats:
    """Exact per-example statistics of ``regime``'s loss ``CE(f(x_in), y)`` over all examples of ``batches``.

    A deep copy of ``model`` is wrapped by ``make_engm`` (``gamma``, SGD with ``lr=0``); per batch,
    one ``loss.backward()`` of the mean loss, then ``step()`` fills ``last_step``. The input
    gradient of the mean loss is ``grad_x l_i / B``, and ``p.grad`` is ``(1/B) sum_i g_i``.
    ``tr C = mean_i ||g_i||^2 - ||g_bar||^2`` with ``g_bar`` the mean gradient over the whole
    probe set, so the result does not depend on the batching. ``model`` itself is not touched.
    """
    probe = copy.deepcopy(model)
    params = [p for p in probe.parameters() if p.requires_grad]
    wrapped, optimizer = make_engm(probe, torch.optim.SGD(params, lr=0.0), gamma=gamma)
    norms: List[torch.Tensor] = []
    weights: List[torch.Tensor] = []
    input_norms: List[torch.Tensor] = []
    grad_sum = [torch.zeros_like(p) for p in params]
    loss_sum = 0.0
    for x, y in batches:
        leaf = regime_input(model, x, y, regime, attack).detach().clone().requires_grad_(True)
        loss = F.cross_entropy(wrapped(leaf), y)
        loss.backward()
        size = len(y)
        input_norms.append(size * leaf.grad.flatten(1).norm(dim=1))
        for total, p in zip(grad_sum, params):
            total += size * p.grad
        optimizer.step()
        norms.append(optimizer.last_step.per_example_norms)
        weights.append(optimizer.last_step.weights)
        optimizer.zero_grad()
        loss_sum += float(loss.detach()) * size
    param_norms = torch.cat(norms).detach().double()
    count = len(param_norms)
    mean_grad_sq = float(sum((g.double() / count).pow(2).sum() for g in grad_sum))
    return GradientStats(
        param_norms=param_norms,
        input_norms=torch.cat(input_norms).detach().double(),
        weights=torch.cat(weights).detach().double(),
        mean_grad_norm=float(param_norms.mean()),
        trace_covariance=float(param_norms.pow(2).mean()) - mean_grad_sq,
        mean_loss=loss_sum / count,
    )


@dataclass(frozen=True)
class DiagnosticsConfig:
    """Settings of :func:`run_diagnostics` (defaults: 10 epochs on digits, minutes on a CPU).

    Both regimes train with constant-lr momentum SGD (lr, momentum and weight decay as
    ``engm-opacus train``'s defaults; no schedule, so a measurement does not depend on ``epochs``).

    Attributes:
        epochs: training epochs per regime (measurements before training and after each epoch).
        batch_size: training batch size ``B`` (also the ``B`` of the batch-mean variance).
        lr, momentum, weight_decay: the MSGD both regimes train with.
        eps, step_size, pgd_steps: the L-infinity PGD of AT (also used to measure AT's loss).
        gamma: the ENGM floor for the weight distribution.
        probe_size: number of training examples measured.
        max_train_examples: cap on the training set (``None``: all 1,257 digits).
        width: base width of the small CNN (GroupNorm, so ``g_i = grad l_i``).
        seed: initialization, batch order and PGD start.
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    eps: float = 8 / 255
    step_size: float = 2 / 255
    pgd_steps: int = 10
    gamma: float = 1.0
    probe_size: int = 256
    max_train_examples: Optional[int] = None
    width: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "probe_size", "width", "pgd_steps"):
            value = getattr(self, name)
            minimum = 0 if name in ("epochs", "pgd_steps") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
        if self.probe_size < 2:
            raise ValueError(f"probe_size must be >= 2 for a correlation, got {self.probe_size}. Fix: e.g. 256.")
        if self.max_train_examples is not None and (
            isinstance(self.max_train_examples, bool)
            or not isinstance(self.max_train_examples, int)
            or self.max_train_examples < 2
        ):
            raise ValueError(
                f"max_train_examples must be an int >= 2 or None (all), got {self.max_train_examples!r}."
            )
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}. Fix: e.g. lr=0.05.")
        validate_gamma(self.gamma)
        validate_threat_model(self.eps, self.step_size, self.pgd_steps)


@dataclass
class DiagnosticsResult:
    """Everything :func:`run_diagnostics` measured.

    Attributes:
        rows: one dict per ``(regime, epoch)`` (the ``summary.csv`` rows).
        final: the :class:`GradientStats` of each regime after the last epoch.
        files: paths written.
    """

    rows: List[Dict[str, float | int | str]] = field(default_factory=list)
    final: Dict[str, GradientStats] = field(default_factory=dict)
    files: List[Path] = field(default_factory=list)

    def ratios(self) -> List[Dict[str, float | int]]:
        """Per measurement: AT/NT ratios of mean gradient norm and of ``tr C``, and both regimes' correlations."""
        by_key = {(row["regime"], row["epoch"]): row for row in self.rows}
        epochs = sorted({int(row["epoch"]) for row in self.rows})
        out = []
        for epoch in epochs:
            nt, at = by_key[("NT", epoch)], by_key[("AT", epoch)]
            out.append(
                {
                    "epoch": epoch,
                    "norm_ratio": float(at["mean_grad_norm"]) / float(nt["mean_grad_norm"]),
                    "variance_ratio": float(at["trace_covariance"]) / float(nt["trace_covariance"]),
                    "pearson_nt": float(nt["pearson"]),
                    "pearson_at": float(at["pearson"]),
                    "spearman_nt": float(nt["spearman"]),
                    "spearman_at": float(at["spearman"]),
                }
            )
        return out


def summary_row(regime: str, epoch: int, stats: GradientStats, config: DiagnosticsConfig) -> Dict[str, float | int | str]:
    """One ``summary.csv`` row."""
    return {
        "regime": regime,
        "epoch": epoch,
        "mean_loss": stats.mean_loss,
        "mean_grad_norm": stats.mean_grad_norm,
        "trace_covariance": stats.trace_covariance,
        "batch_mean_variance": stats.batch_mean_variance(config.batch_size),
        "pearson": pearson(stats.param_norms, stats.input_norms),
        "spearman": spearman(stats.param_norms, stats.input_norms),
        "mean_weight": float(stats.weights.mean()),
        "fraction_above_gamma": float((stats.param_norms > config.gamma).double().mean()),
    }


def train_epoch(
    model: nn.Module, optimizer: torch.optim.Optimizer, loader: torch.utils.data.DataLoader, regime: str, attack: Attack
) -> None:
    """One epoch of MSGD on the regime's mean loss."""
    model.train()
    for x, y in loader:
        loss = F.cross_entropy(model(regime_input(model, x, y, regime, attack)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def run_diagnostics(out_dir: Path | str, config: DiagnosticsConfig = DiagnosticsConfig()) -> DiagnosticsResult:
    """Train NT and PGD-AT side by side on digits, measure, and write CSV files and PNG plots to ``out_dir``."""
    require("matplotlib", "The diagnostics plots")  # fails before the training, not after it
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = load_digits_splits()
    train = splits.train
    assert isinstance(train, TensorDataset)
    images, labels = train.tensors
    if config.max_train_examples is not None:
        images, labels = images[: config.max_train_examples], labels[: config.max_train_examples]
    probe_count = min(config.probe_size, len(images))
    probe = [
        (images[i : min(i + config.batch_size, probe_count)], labels[i : min(i + config.batch_size, probe_count)])
        for i in range(0, probe_count, config.batch_size)
    ]
    result = DiagnosticsResult()
    per_example: List[Dict[str, float | int | str]] = []
    for regime in REGIMES:
        torch.manual_seed(config.seed)
        model = small_cnn(num_classes=splits.num_classes, in_channels=splits.in_channels, width=config.width)
        optimizer = torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        attack = partial(
            pgd_linf, eps=config.eps, step_size=config.step_size, steps=config.pgd_steps,
            generator=torch.Generator().manual_seed(config.seed),
        )
        loader = make_loader(
            TensorDataset(images, labels), config.batch_size, shuffle=True,
            generator=torch.Generator().manual_seed(config.seed),
        )
        for epoch in range(config.epochs + 1):
            if epoch > 0:
                train_epoch(model, optimizer, loader, regime, attack)
            stats = gradient_stats(model, probe, regime, attack, config.gamma)
            result.rows.append(summary_row(regime, epoch, stats, config))
            for i, (n, m, w) in enumerate(zip(stats.param_norms, stats.input_norms, stats.weights)):
                per_example.append(
                    {"regime": regime, "epoch": epoch, "example": i, "param_grad_norm": float(n),
                     "input_grad_norm": float(m), "weight": float(w)}
                )
        result.final[regime] = stats
    result.files += [
        write_csv(result.rows, out / "summary.csv"),
        write_csv(per_example, out / "per_example.csv"),
        write_csv(result.ratios(), out / "ratios.csv"),
    ]
    result.files += plot_all(out, result, config)
    return result
