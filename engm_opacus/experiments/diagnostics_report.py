"""Plots and the terminal table of the gradient diagnostics (:mod:`engm_opacus.experiments.diagnostics`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, List

from rich.table import Table

from engm_opacus.training.extras import require

if TYPE_CHECKING:
    from engm_opacus.experiments.diagnostics import DiagnosticsConfig, DiagnosticsResult


def plot_all(out: Path, result: DiagnosticsResult, config: DiagnosticsConfig) -> List[Path]:
    """Write the three PNG plots (matplotlib's object API, Agg canvas; no pyplot state); return their paths.

    Raises:
        MissingExtraError: matplotlib is not installed (``pip install 'engm-opacus[plots]'``).
    """
    Figure = require("matplotlib.figure", "The diagnostics plots").Figure  # noqa: N806 - the class
    regimes = list(dict.fromkeys(str(row["regime"]) for row in result.rows))
    series = {regime: [row for row in result.rows if row["regime"] == regime] for regime in regimes}

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
    for regime in regimes:
        weights = result.final[regime].weights.numpy()
        ax.hist(weights, bins=30, alpha=0.6, label=regime)
    ax.set_xlabel(f"w_i = 1 / max(||g_i||, gamma), gamma = {config.gamma:g}")
    ax.set_yscale("log")  # the examples with n_i > gamma are the tail
    ax.set_ylabel("examples")
    ax.set_title(f"ENGM weights after epoch {config.epochs}")
    ax.legend()
    paths.append(save(fig, out / "weights.png"))
    return paths


def save(fig: Any, path: Path) -> Path:
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
