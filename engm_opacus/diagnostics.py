"""Gradient diagnostics behind ENGM: natural training (NT) vs PGD-AT on the same model and data.

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
  for AT): how well the cheap variant's estimate (:mod:`engm_opacus.cheap`) can track;
* the ENGM weights ``w_i = 1/max(||g_i||, gamma)`` for a given ``gamma``.

Results: ``summary.csv`` (one row per regime and measurement), ``per_example.csv`` (norms
and weights of every probe example), PNG plots, and the AT/NT ratios.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from matplotlib.figure import Figure
from rich.table import Table
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from engm_opacus.attacks import validate_threat_model
from engm_opacus.cheap import exact_per_example_norms, pearson
from engm_opacus.data import load_digits_splits, make_loader
from engm_opacus.losses.pgd_at import PGDAT
from engm_opacus.models import small_cnn
from engm_opacus.weights import engm_weights, validate_gamma

REGIMES: Tuple[str, ...] = ("NT", "AT")


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks ``1..N`` of ``values``, ties sharing their average rank (as Spearman's rho needs)."""
    unique, inverse, counts = torch.unique(values.detach().double(), return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    return ((ends - counts + 1 + ends) / 2)[inverse]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation: Pearson correlation of the average ranks."""
    return pearson(average_ranks(x.flatten()), average_ranks(y.flatten()))


@dataclass(frozen=True)
class GradientStats:
    """Per-example gradient statistics of one loss on one probe set.

    Attributes:
        param_norms: ``[P]`` ``||g_i||_2``.
        input_norms: ``[P]`` ``||grad_x l_i||_2``.
        mean_grad_norm: ``(1/P) sum_i ||g_i||``.
        trace_covariance: ``(1/P) sum_i ||g_i - g_bar||^2``.
        mean_loss: ``(1/P) sum_i l_i``.
    """

    param_norms: torch.Tensor
    input_norms: torch.Tensor
    mean_grad_norm: float
    trace_covariance: float
    mean_loss: float

    def batch_mean_variance(self, batch_size: int) -> float:
        """``E||mean of B g_i - g_bar||^2 = tr C / B`` (examples drawn with replacement)."""
        return self.trace_covariance / batch_size


def regime_losses(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, regime: str, attack: PGDAT
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``([B] per-example losses, leaf input they were computed at)`` for ``"NT"`` (clean) or ``"AT"`` (PGD)."""
    if regime == "NT":
        leaf = x.detach().clone().requires_grad_(True)
        return F.cross_entropy(model(leaf), y, reduction="none"), leaf
    if regime == "AT":
        out = attack(model, x, y, track_input_grad=True)
        return out.per_example, out.x_adv
    raise ValueError(f"Unknown regime {regime!r}. Fix: use one of {', '.join(REGIMES)}.")


def gradient_stats(
    model: nn.Module, batches: Sequence[Tuple[torch.Tensor, torch.Tensor]], regime: str, attack: PGDAT
) -> GradientStats:
    """Exact per-example statistics of ``regime``'s loss over all examples of ``batches``.

    ``tr C = mean_i ||g_i||^2 - ||g_bar||^2`` with ``g_bar`` the mean gradient over the whole
    probe set (accumulated across batches), so the result does not depend on the batching.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    param_norms: List[torch.Tensor] = []
    input_norms: List[torch.Tensor] = []
    grad_sum = [torch.zeros_like(p) for p in params]
    loss_sum = 0.0
    for x, y in batches:
        losses, leaf = regime_losses(model, x, y, regime, attack)
        param_norms.append(exact_per_example_norms(losses, params).detach())
        *grads, input_grad = torch.autograd.grad(losses.sum(), params + [leaf])
        for total, g in zip(grad_sum, grads):
            total += g
        input_norms.append(input_grad.flatten(1).norm(dim=1))
        loss_sum += float(losses.detach().sum())
    norms = torch.cat(param_norms).double()
    count = len(norms)
    mean_grad_sq = float(sum((g.double() / count).pow(2).sum() for g in grad_sum))
    return GradientStats(
        param_norms=norms,
        input_norms=torch.cat(input_norms).double(),
        mean_grad_norm=float(norms.mean()),
        trace_covariance=float(norms.pow(2).mean()) - mean_grad_sq,
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
        width: base width of the small CNN (GroupNorm, so ``g_i`` is exact).
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
    weights = engm_weights(stats.param_norms, config.gamma)
    return {
        "regime": regime,
        "epoch": epoch,
        "mean_loss": stats.mean_loss,
        "mean_grad_norm": stats.mean_grad_norm,
        "trace_covariance": stats.trace_covariance,
        "batch_mean_variance": stats.batch_mean_variance(config.batch_size),
        "pearson": pearson(stats.param_norms, stats.input_norms),
        "spearman": spearman(stats.param_norms, stats.input_norms),
        "mean_weight": float(weights.mean()),
        "fraction_above_gamma": float((stats.param_norms > config.gamma).double().mean()),
    }


def train_epoch(
    model: nn.Module, optimizer: torch.optim.Optimizer, loader: torch.utils.data.DataLoader, regime: str, attack: PGDAT
) -> None:
    """One epoch of MSGD on the regime's mean loss."""
    model.train()
    for x, y in loader:
        losses, _ = regime_losses(model, x, y, regime, attack)
        optimizer.zero_grad()
        losses.mean().backward()
        optimizer.step()


def run_diagnostics(out_dir: Path | str, config: DiagnosticsConfig = DiagnosticsConfig()) -> DiagnosticsResult:
    """Train NT and PGD-AT side by side on digits, measure, and write CSV files and PNG plots to ``out_dir``."""
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
        (images[i : i + config.batch_size], labels[i : i + config.batch_size])
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
        attack = PGDAT(
            eps=config.eps, step_size=config.step_size, steps=config.pgd_steps,
            generator=torch.Generator().manual_seed(config.seed),
        )
        loader = make_loader(
            TensorDataset(images, labels), config.batch_size, shuffle=True,
            generator=torch.Generator().manual_seed(config.seed),
        )
        for epoch in range(config.epochs + 1):
            if epoch > 0:
                train_epoch(model, optimizer, loader, regime, attack)
            stats = gradient_stats(model, probe, regime, attack)
            result.rows.append(summary_row(regime, epoch, stats, config))
            weights = engm_weights(stats.param_norms, config.gamma)
            for i, (n, m, w) in enumerate(zip(stats.param_norms, stats.input_norms, weights)):
                per_example.append(
                    {"regime": regime, "epoch": epoch, "example": i, "param_grad_norm": float(n),
                     "input_grad_norm": float(m), "weight": float(w)}
                )
        result.final[regime] = stats
    result.files += [
        write_csv(out / "summary.csv", result.rows),
        write_csv(out / "per_example.csv", per_example),
        write_csv(out / "ratios.csv", result.ratios()),
    ]
    result.files += plot_all(out, result, config)
    return result


def write_csv(path: Path, rows: Sequence[Dict]) -> Path:
    """Write ``rows`` (dicts with the same keys) as CSV with a header; return ``path``."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path




def plot_all(out: Path, result: DiagnosticsResult, config: DiagnosticsConfig) -> List[Path]:
    """Write the three PNG plots (matplotlib's object API, Agg canvas; no pyplot state); return their paths."""
    series = {regime: [row for row in result.rows if row["regime"] == regime] for regime in REGIMES}

    def curves(ax, key: str, label: str, log: bool = False) -> None:
        for regime, rows in series.items():
            ax.plot([r["epoch"] for r in rows], [r[key] for r in rows], marker="o", label=regime)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.legend()

    paths = []
    fig = Figure(figsize=(10, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    curves(left, "mean_grad_norm", "mean per-example ||grad_theta l_i||")
    curves(right, "trace_covariance", "tr Cov(g_i) = mean ||g_i - g_bar||^2", log=True)
    fig.suptitle("Per-example gradient norm and variance: natural training vs PGD-AT (MSGD)")
    paths.append(save(fig, out / "gradient_norm_variance.png"))

    fig = Figure(figsize=(10, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    for regime, rows in series.items():
        left.plot([r["epoch"] for r in rows], [r["pearson"] for r in rows], marker="o", label=f"{regime} Pearson")
        left.plot([r["epoch"] for r in rows], [r["spearman"] for r in rows], marker="s", ls="--", label=f"{regime} Spearman")
        stats = result.final[regime]
        right.scatter(stats.input_norms.numpy(), stats.param_norms.numpy(), s=8, alpha=0.6, label=regime)
    left.set_xlabel("epoch")
    left.set_ylabel("corr(||grad_theta l_i||, ||grad_x l_i||)")
    left.legend()
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("||grad_x l_i||")
    right.set_ylabel("||grad_theta l_i||")
    right.set_title(f"after epoch {config.epochs}")
    right.legend()
    paths.append(save(fig, out / "norm_correlation.png"))

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for regime in REGIMES:
        weights = engm_weights(result.final[regime].param_norms, config.gamma).numpy()
        ax.hist(weights, bins=30, alpha=0.6, label=regime)
    ax.set_xlabel(f"w_i = 1 / max(||g_i||, gamma), gamma = {config.gamma:g}")
    ax.set_yscale("log")  # the examples with n_i > gamma are the tail
    ax.set_ylabel("examples")
    ax.set_title(f"ENGM weights after epoch {config.epochs}")
    ax.legend()
    paths.append(save(fig, out / "weights.png"))
    return paths


def save(fig: Figure, path: Path) -> Path:
    """Save ``fig`` as PNG at ``path``; return ``path``."""
    fig.savefig(path, dpi=100)
    return path


def ratios_table(result: DiagnosticsResult) -> Table:
    """A rich table: per measurement, AT/NT ratios of mean gradient norm and ``tr C``, and the correlations."""
    table = Table(title="AT vs NT gradient statistics (probe set, exact per-example gradients)")
    for header in ("epoch", "norm AT/NT", "var AT/NT", "Pearson NT", "Pearson AT", "Spearman NT", "Spearman AT"):
        table.add_column(header, justify="right")
    for row in result.ratios():
        table.add_row(
            str(row["epoch"]),
            f"{row['norm_ratio']:.2f}x",
            f"{row['variance_ratio']:.2f}x",
            *(f"{row[key]:.3f}" for key in ("pearson_nt", "pearson_at", "spearman_nt", "spearman_at")),
        )
    return table
