"""The ENGM-vs-MSGD benchmark's report: per-setting mean +- std, sensitivity spreads, tables, CSV files and plots.

:mod:`engm_opacus.experiments.benchmark` produces one row per run; :func:`report` aggregates
them (mean and sample standard deviation over seeds), prints rich tables and writes
``runs.csv``, ``main.csv``, ``sensitivity.csv``, ``results.md`` and two PNG plots. Tables name
the optimizers MSGD, ENGM and ENGM (input-norm); the CSV files keep their config names
(``msgd``, ``engm``, ``engm-input-norm``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from rich.console import Console
from rich.table import Table

from engm_opacus.training.config import DEFAULT_LR, OPTIMIZER_LABELS
from engm_opacus.training.extras import require
from engm_opacus.training.logs import atomic_write_text, write_csv

if TYPE_CHECKING:
    from engm_opacus.experiments.benchmark import BenchConfig

METRICS: Tuple[Tuple[str, str], ...] = (
    ("clean_last", "clean (last)"),
    ("pgd20_last", "PGD-20 (last)"),
    ("aa_last", "AA (last)"),
    ("clean_best", "clean (best)"),
    ("pgd20_best", "PGD-20 (best)"),
    ("aa_best", "AA (best)"),
    ("gap_pgd20", "best-last PGD-20"),
    ("best_epoch", "best epoch"),
    ("time_s", "train time s"),
    ("fraction_above_gamma", "ENGM frac n_i>gamma"),
)
"""Per-run metrics aggregated as mean +- std: (key, table header). Accuracies are fractions;
``fraction_above_gamma`` is the last epoch's mean share of examples with ``n_i > gamma`` (ENGM only)."""

GROUP_KEYS: Tuple[str, ...] = ("part", "dataset", "method", "optimizer", "lr", "weight_decay", "gamma", "epochs")
"""Columns identifying a setting; runs sharing them (differing in seed) are aggregated."""

SUMMARY_COLUMNS: Tuple[str, ...] = GROUP_KEYS + ("seeds", "autoattack_runs") + tuple(
    f"{key}_{stat}" for key, _ in METRICS for stat in ("mean", "std")
)
"""Columns of ``main.csv`` (and of the ``main`` rows of :func:`summarize`)."""


def label(optimizer: str) -> str:
    """The table name of a benchmark optimizer (``engm-input-norm`` -> ``ENGM (input-norm)``)."""
    return OPTIMIZER_LABELS.get(optimizer, optimizer)


def mean_std(values: Iterable[float]) -> Tuple[float, float]:
    """Mean and sample std (``ddof=1``; 0 for one value) of the finite values; NaNs if none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return float("nan"), float("nan")
    return float(np.mean(finite)), float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0


def summarize(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per setting (:data:`GROUP_KEYS`): ``seeds``, ``autoattack_runs``, ``<metric>_mean`` / ``_std``."""
    groups: Dict[Tuple[Any, ...], List[Dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(str(row[k]) for k in GROUP_KEYS), []).append(row)
    summary = []
    for members in groups.values():
        out = {k: members[0][k] for k in GROUP_KEYS}
        out["factor"] = members[0].get("factor", 1.0)
        out["seeds"] = len(members)
        out["autoattack_runs"] = sum(1 for m in members if math.isfinite(m["aa_last"]))
        for key, _ in METRICS:
            out[f"{key}_mean"], out[f"{key}_std"] = mean_std(m[key] for m in members)
        summary.append(out)
    return summary


def sensitivity(summary: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per optimizer and swept axis: final PGD-20 (last) mean per multiplier, spread ``max - min`` and std."""
    out = []
    for part, axis in (("sensitivity-lr", "lr"), ("sensitivity-wd", "weight_decay")):
        for optimizer in dict.fromkeys(r["optimizer"] for r in summary if r["part"] == part):
            points = sorted((r["factor"], r[axis], r["pgd20_last_mean"]) for r in summary if r["part"] == part and r["optimizer"] == optimizer)
            values = [v for _, _, v in points]
            out.append({
                "axis": "lr" if axis == "lr" else "weight decay",
                "optimizer": optimizer,
                "settings": ", ".join(f"x{f:g} ({p:g}): {v:.1%}" for f, p, v in points),
                "spread": max(values) - min(values),
                "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            })
    return out


def _fmt(mean: float, std: float, percent: bool) -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{100 * mean:.1f}±{100 * std:.1f}" if percent else f"{mean:.1f}±{std:.1f}"


def table_rows(summary: Sequence[Dict[str, Any]], part_prefix: str) -> Tuple[List[str], List[List[str]]]:
    """Header and formatted rows (``mean ± std``, accuracies in %) of the settings of a part."""
    header = ["method", "optimizer", "lr", "wd", "gamma", "seeds"] + [title for _, title in METRICS]
    rows = []
    for r in summary:
        if not r["part"].startswith(part_prefix):
            continue
        cells = [r["method"], label(r["optimizer"]), f"{r['lr']:g}", f"{r['weight_decay']:g}", "-" if not math.isfinite(r["gamma"]) else f"{r['gamma']:g}", f"{r['seeds']} (AA {r['autoattack_runs']})"]
        for key, _ in METRICS:
            cells.append(_fmt(r[f"{key}_mean"], r[f"{key}_std"], key not in ("best_epoch", "time_s")))
        rows.append(cells)
    return header, rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def rich_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> Table:
    """The same table for the terminal."""
    table = Table(title=title)
    for name in header:
        table.add_column(name, justify="left" if name in ("method", "optimizer") else "right")
    for row in rows:
        table.add_row(*row)
    return table


def new_figure(**kwargs: Any) -> Any:
    """A ``matplotlib.figure.Figure`` (object API, no pyplot state); matplotlib is the ``[plots]`` extra, imported here."""
    return require("matplotlib.figure", "The benchmark's plots").Figure(**kwargs)


def plot_robust_over_epochs(rows: Sequence[Dict[str, Any]], path: Path) -> None:
    """Validation PGD accuracy per epoch (mean over seeds, band = +- std), one panel per AT method."""
    main = [r for r in rows if r["part"] == "main"]
    methods = list(dict.fromkeys(r["method"] for r in main))
    figure = new_figure(figsize=(4 * len(methods), 3.2))
    axes = figure.subplots(1, len(methods), squeeze=False)
    for axis, method in zip(axes[0], methods):
        for optimizer in dict.fromkeys(r["optimizer"] for r in main):
            curves = np.array([r["val_pgd_history"] for r in main if r["method"] == method and r["optimizer"] == optimizer])
            epochs = np.arange(1, curves.shape[1] + 1)
            mean, std = curves.mean(axis=0), curves.std(axis=0)
            axis.plot(epochs, 100 * mean, marker="o", label=label(optimizer))
            axis.fill_between(epochs, 100 * (mean - std), 100 * (mean + std), alpha=0.2)
        axis.set_title(method)
        axis.set_xlabel("epoch")
        axis.set_ylabel("val PGD acc (%)")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def plot_sweeps(summary: Sequence[Dict[str, Any]], path: Path) -> bool:
    """Final PGD-20 (last) vs the lr, weight-decay and gamma factors (error bars = std over seeds); ``False`` if no sweep ran."""
    labels = {"sensitivity-lr": "lr / optimizer's default lr", "sensitivity-wd": "weight decay / default", "gamma": "gamma / default gamma"}
    panels = [p for p in labels if any(r["part"] == p for r in summary)]
    if not panels:
        return False
    figure = new_figure(figsize=(4 * len(panels), 3.2))
    axes = figure.subplots(1, len(panels), squeeze=False)
    for axis, part in zip(axes[0], panels):
        factors: set = set()
        for optimizer in dict.fromkeys(r["optimizer"] for r in summary if r["part"] == part):
            points = sorted((r["factor"], r["pgd20_last_mean"], r["pgd20_last_std"]) for r in summary if r["part"] == part and r["optimizer"] == optimizer)
            xs, ys, es = zip(*points)
            factors.update(xs)
            axis.errorbar(xs, [100 * y for y in ys], yerr=[100 * e for e in es], marker="o", capsize=3, label=label(optimizer))
        axis.set_xscale("log")
        axis.set_xticks(sorted(factors), [f"x{f:g}" for f in sorted(factors)])
        axis.minorticks_off()
        axis.set_xlabel(labels[part])
        axis.set_ylabel("test PGD-20 acc, last (%)")
        axis.set_title(f"PGD-AT: {part.replace('sensitivity-', '')} sweep")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return True


def budget_text(bench: BenchConfig) -> str:
    """One paragraph stating the budget the numbers were measured with."""
    b = bench.base
    aa = (
        f"AutoAttack (pyautoattack 'standard') on the first {bench.autoattack_examples} test examples"
        + (f" for the first {bench.autoattack_seeds} seed(s) only" if bench.autoattack_seeds else "")
        if bench.autoattack_examples
        else "AutoAttack off"
    )
    return (
        f"{'QUICK mode (reduced budget: numbers are indicative only). ' if bench.quick else ''}"
        f"{b.dataset}, {b.model} ({b.norm} norm), {b.epochs} epochs, batch {b.batch_size}, {b.schedule} schedule, "
        f"momentum {b.momentum}, eps {b.eps * 255:.3g}/255, training PGD-{b.pgd_steps} step {b.step_size * 255:.3g}/255, "
        f"validation PGD-{b.val_pgd_steps}, test PGD-{b.test_pgd_steps}; "
        f"train/val/test examples: {b.max_train_examples or 'all'}/{b.max_val_examples or 'all'}/{b.max_test_examples or 'all'}; "
        f"{aa}; seeds {list(bench.seeds)} (sweeps: first {bench.sweep_seeds or len(bench.seeds)}); "
        f"lr MSGD {bench.lr_msgd or DEFAULT_LR['msgd']:g}, lr ENGM {bench.lr_engm or DEFAULT_LR['engm']:g}, gamma {b.gamma:g}, wd {b.weight_decay:g}; "
        f"{bench.jobs} parallel job(s)."
    )


def report(bench: BenchConfig, rows: Sequence[Dict[str, Any]], wall_s: float, console: Optional[Console] = None) -> Dict[str, Any]:
    """Print rich tables; write CSV, Markdown and PNG files to ``bench.out_dir``; return the summaries.

    Files: ``runs.csv`` (one row per run), ``main.csv`` (:data:`SUMMARY_COLUMNS`, all parts),
    ``sensitivity.csv``, ``results.md`` (all tables), ``robust_over_epochs.png``, ``sweeps.png``.
    """
    console = console or Console()
    out = Path(bench.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    spread = sensitivity(summary)
    run_columns = GROUP_KEYS + ("factor", "seed") + tuple(k for k, _ in METRICS) + ("val_gap", "fraction_above_gamma", "direction_norm")
    write_csv(rows, out / "runs.csv", run_columns)
    write_csv(summary, out / "main.csv", SUMMARY_COLUMNS)
    write_csv(spread, out / "sensitivity.csv", ("axis", "optimizer", "settings", "spread", "std"))
    plot_robust_over_epochs(rows, out / "robust_over_epochs.png")
    has_sweeps = plot_sweeps(summary, out / "sweeps.png")

    budget = budget_text(bench)
    console.print(budget)
    markdown = [f"# ENGM vs MSGD\n\n{budget}\n\nAccuracies in % on the test split, mean ± std over seeds. "
                "Wall time of the whole benchmark: " f"{wall_s:.0f} s.\n"]
    titles = (("main", "AT methods x optimizers"), ("sensitivity", "Sensitivity sweep (PGD-AT)"), ("gamma", "Gamma sweep (PGD-AT, ENGM)"))
    for prefix, title in titles:
        header, formatted = table_rows(summary, prefix)
        if formatted:
            console.print(rich_table(title, header, formatted))
            markdown.append(f"\n## {title}\n\n" + markdown_table(header, formatted))
    if spread:
        header = ["axis", "optimizer", "final PGD-20 (last) per setting", "spread max-min", "std"]
        formatted = [[s["axis"], label(s["optimizer"]), s["settings"], f"{100 * s['spread']:.1f}", f"{100 * s['std']:.1f}"] for s in spread]
        console.print(rich_table("Sensitivity: spread of final robust accuracy (percentage points)", header, formatted))
        markdown.append("\n## Spread of final robust accuracy (percentage points)\n\n" + markdown_table(header, formatted))
    markdown.append("\nPlots: `robust_over_epochs.png`" + (", `sweeps.png`" if has_sweeps else "") + "\n")
    atomic_write_text("".join(markdown), out / "results.md")
    console.print(f"Wrote runs.csv, main.csv, sensitivity.csv, results.md and plots to {out} ({wall_s:.0f} s).")
    return {"summary": summary, "sensitivity": spread, "markdown": "".join(markdown)}


