"""The ENGM-vs-MSGD benchmark's report: rich tables first, then CSV, Markdown and PNG files in the results folder.

Files (:func:`report`): ``tuning.csv`` (every tuning run, validation only), ``main.csv``
(:data:`~engm_opacus.experiments.bench_tables.MAIN_COLUMNS`), ``runs.csv`` (every final and
gamma-study run), ``paired.csv`` (ENGM vs MSGD paired tests), ``sensitivity.csv``,
``gamma.csv``, ``results.md`` (all tables), ``robust_over_epochs.png`` (validation PGD per epoch
of the final runs) and ``sensitivity.png`` (final validation PGD over each lr grid).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from engm_opacus.experiments.bench_runs import gamma_text
from engm_opacus.experiments.bench_select import COLLAPSE_FACTOR, Setting, paired_comparisons
from engm_opacus.experiments.bench_tables import (
    GAMMA_COLUMNS, MAIN_COLUMNS, PAIRED_COLUMNS, RUN_COLUMNS, SENSITIVITY_COLUMNS, TUNING_COLUMNS, gamma_study, gamma_table, label,
    main_table, paired_table, sensitivity, sensitivity_table, summarize_final, tuning_rows, tuning_table, verdict_text,
)
from engm_opacus.training.extras import require
from engm_opacus.training.logs import atomic_write_text, write_csv

if TYPE_CHECKING:
    from engm_opacus.experiments.benchmark import BenchConfig


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def rich_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> Table:
    """The same table for the terminal."""
    table = Table(title=title)
    for name in header:
        table.add_column(name, justify="left" if name in ("method", "optimizer", "comparison", "metric", "status", "test") else "right")
    for row in rows:
        table.add_row(*row)
    return table


def new_figure(**kwargs: Any) -> Any:
    """A ``matplotlib.figure.Figure`` (object API, no pyplot state); matplotlib is the ``[plots]`` extra, imported here."""
    return require("matplotlib.figure", "The benchmark's plots").Figure(**kwargs)


def plot_robust_over_epochs(final_rows: Sequence[Dict[str, Any]], path: Path) -> None:
    """Validation PGD accuracy per epoch of the final runs (mean over seeds, band = ± std), one panel per (eps, AT method)."""
    runs = [r for r in final_rows if r["val_pgd_history"]]
    panels = list(dict.fromkeys((r["eps"], r["method"]) for r in runs)) or [(0.0, "no finished run")]
    figure = new_figure(figsize=(4 * len(panels), 3.2))
    axes = figure.subplots(1, len(panels), squeeze=False)
    for axis, (eps, method) in zip(axes[0], panels):
        for optimizer in dict.fromkeys(r["optimizer"] for r in runs):
            curves = [r["val_pgd_history"] for r in runs if (r["eps"], r["method"], r["optimizer"]) == (eps, method, optimizer)]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            array = np.array([c[:length] for c in curves], dtype=float)
            epochs = np.arange(1, length + 1)
            mean, std = array.mean(axis=0), array.std(axis=0)
            axis.plot(epochs, 100 * mean, marker="o", markersize=3, label=label(optimizer))
            axis.fill_between(epochs, 100 * (mean - std), 100 * (mean + std), alpha=0.2)
        axis.set_title(f"{method}, eps {eps:g}")
        axis.set_xlabel("epoch")
        axis.set_ylabel("val PGD acc (%)")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def plot_sweeps(
    points: Sequence[Dict[str, Any]], path: Path, *, x: str = "factor", y: str = "pgd20_last", panel: str = "part",
    xlabel: str = "factor", ylabel: str = "test PGD-20 acc, last (%)",
) -> bool:
    """Curves of ``y`` (``<y>_mean``, error bars ``<y>_std`` when present) over ``x`` (log scale), one line per optimizer, one panel per ``panel`` value.

    Returns ``False`` (and writes nothing) when ``points`` is empty.
    """
    Figure = require("matplotlib.figure", "The benchmark's plots").Figure
    if not points:
        return False
    panels = list(dict.fromkeys(p[panel] for p in points))
    figure = Figure(figsize=(4 * len(panels), 3.2))
    axes = figure.subplots(1, len(panels), squeeze=False)
    for axis, value in zip(axes[0], panels):
        for optimizer in dict.fromkeys(p["optimizer"] for p in points if p[panel] == value):
            curve = sorted((p[x], p[f"{y}_mean"], p.get(f"{y}_std", 0.0)) for p in points if p[panel] == value and p["optimizer"] == optimizer)
            xs, ys, es = zip(*curve)
            axis.errorbar(xs, [100 * v for v in ys], yerr=[100 * e for e in es], marker="o", capsize=3, label=label(optimizer))
        axis.set_xscale("log")
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.set_title(str(value))
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return True


def sensitivity_points(spread: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The lr-grid curves of :func:`~engm_opacus.experiments.bench_tables.sensitivity` as :func:`plot_sweeps` points (panel: method and eps)."""
    return [
        {"panel": f"{s['method']}, eps {s['eps']:g}", "optimizer": s["optimizer"], "lr": lr, "val_pgd_last_mean": value}
        for s in spread for lr, value in s["points"]
    ]


def budget_text(bench: "BenchConfig") -> str:
    """One paragraph stating the protocol and budget the numbers were measured with."""
    b = bench.base
    aa = "AutoAttack off" if bench.autoattack_examples == 0 else (
        "AutoAttack (pyautoattack 'standard') on "
        + (f"the first {bench.autoattack_examples}" if bench.autoattack_examples else "all the PGD-20")
        + " test examples, last and best checkpoint"
    )
    return (
        f"{'QUICK mode (smoke-test budget: numbers mean nothing). ' if bench.quick else ''}"
        f"{b.dataset}, {b.model} ({b.norm} norm), {b.epochs} epochs, batch {b.batch_size}, {b.schedule} schedule, momentum {b.momentum}, "
        f"wd {b.weight_decay:g}; eps {', '.join(f'{e:g}' for e in bench.eps)} (step eps/4), training PGD-{b.pgd_steps}, "
        f"validation PGD-{b.val_pgd_steps}, test PGD-{b.test_pgd_steps}; train/val/test examples "
        f"{b.max_train_examples or 'all'}/{b.max_val_examples or 'all'}/{b.max_test_examples or 'all'}. "
        f"Tuning on validation, seed {bench.tuning_seed}: lr grid MSGD {list(bench.lr_grid_msgd)}, ENGM (both variants, gamma "
        f"{gamma_text(b.gamma)}) {list(bench.lr_grid_engm)}; selection = best-checkpoint validation PGD, ties to the smaller lr, "
        f"collapsed runs (non-finite loss or final val clean <= {COLLAPSE_FACTOR:g}/classes) excluded. Final: seeds {list(bench.seeds)} on "
        f"the test split; {aa}. Gamma study (PGD-AT, ENGM): {[gamma_text(g) for g in bench.gamma_study]}. {bench.jobs} parallel job(s)."
    )


def _section(console: Console, markdown: List[str], title: str, table: Any, note: str = "") -> None:
    header, rows = table
    if rows:
        console.print(rich_table(title, header, rows))
        markdown.append(f"\n## {title}\n\n" + (f"{note}\n\n" if note else "") + markdown_table(header, rows))


def report(
    bench: "BenchConfig", tuning: Sequence[Dict[str, Any]], final: Sequence[Dict[str, Any]], gamma: Sequence[Dict[str, Any]],
    selected: Dict[Setting, Optional[float]], wall_s: float, console: Optional[Console] = None,
) -> Dict[str, Any]:
    """Print the rich tables, then write the CSV, Markdown and PNG files to ``bench.out_dir``; return the summaries."""
    console = console or Console()
    out = Path(bench.out_dir)
    summary = summarize_final(final)
    tuned = tuning_rows(tuning, selected)
    spread = sensitivity(tuning)
    paired = paired_comparisons(final)
    gamma_summary, verdicts = gamma_study(final, gamma)

    budget = budget_text(bench)
    console.print(budget)
    markdown = [f"# ENGM vs MSGD\n\n{budget}\n\nWall time of this invocation: {wall_s:.0f} s (reused runs cost nothing).\n"]
    _section(console, markdown, "Main table: selected lr, test accuracy in % (mean ± std over seeds)", main_table(summary))
    _section(console, markdown, "Paired tests across seeds (vs MSGD)", paired_table(paired),
             "Differences in percentage points, paired by seed; paired t-test (scipy) or exact sign-flip permutation test.")
    _section(console, markdown, "Tuning on validation (seed %d)" % bench.tuning_seed, tuning_table(tuned))
    _section(console, markdown, "Sensitivity: final validation PGD over the lr grid (%)", sensitivity_table(spread))
    _section(console, markdown, "Gamma study (PGD-AT, exact ENGM, test PGD-20 in %)", gamma_table(gamma_summary))
    for verdict in verdicts:
        console.print(verdict_text(verdict))
        markdown.append(f"\n{verdict_text(verdict)}\n")
    markdown.append("\nPlots: `robust_over_epochs.png`, `sensitivity.png`.\n")

    out.mkdir(parents=True, exist_ok=True)  # files only after the tables are on the screen
    write_csv(tuned, out / "tuning.csv", TUNING_COLUMNS)
    write_csv(summary, out / "main.csv", MAIN_COLUMNS)
    write_csv([*final, *gamma], out / "runs.csv", RUN_COLUMNS)
    write_csv(paired, out / "paired.csv", PAIRED_COLUMNS)
    write_csv(spread, out / "sensitivity.csv", SENSITIVITY_COLUMNS)
    write_csv(gamma_summary, out / "gamma.csv", GAMMA_COLUMNS)
    plot_robust_over_epochs(final, out / "robust_over_epochs.png")
    plot_sweeps(sensitivity_points(spread), out / "sensitivity.png", x="lr", y="val_pgd_last", panel="panel",
                xlabel="learning rate", ylabel="final val PGD acc (%)")
    atomic_write_text("".join(markdown), out / "results.md")
    console.print(f"Wrote tuning.csv, main.csv, runs.csv, paired.csv, sensitivity.csv, gamma.csv, results.md and plots to {out} ({wall_s:.0f} s).")
    return {"summary": summary, "tuning_table": tuned, "sensitivity": spread, "paired": paired, "gamma": gamma_summary, "verdicts": verdicts,
            "markdown": "".join(markdown)}
