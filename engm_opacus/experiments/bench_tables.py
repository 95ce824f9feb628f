"""The benchmark's tables: per-setting mean ± std over seeds, tuning grid, lr sensitivity, paired tests and the gamma study.

Accuracies are fractions in the rows and CSV files and percentages (``mean±std``) in the
formatted tables. Tables name the optimizers MSGD, ENGM and ENGM (input-norm); the CSV files
keep the config names (``msgd``, ``engm``, ``engm-input-norm``).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

from engm_opacus.experiments.bench_runs import gamma_text
from engm_opacus.experiments.bench_select import Setting, gamma_verdict, mean_std
from engm_opacus.training.config import OPTIMIZER_LABELS

METRICS: Tuple[Tuple[str, str], ...] = (
    ("clean_last", "clean (last)"),
    ("pgd20_last", "PGD-20 (last)"),
    ("aa_last", "AA (last)"),
    ("clean_best", "clean (best)"),
    ("pgd20_best", "PGD-20 (best)"),
    ("aa_best", "AA (best)"),
    ("gap_pgd20", "best-last PGD-20"),
    ("best_epoch", "best epoch"),
    ("time_s", "wall s (train+val)"),
)
"""Per-run test metrics of the final phase aggregated as mean ± std over seeds: (key, table header)."""

NOT_PERCENT = ("best_epoch", "time_s")

MAIN_COLUMNS: Tuple[str, ...] = ("eps", "method", "optimizer", "lr", "gamma", "seeds", "diverged_share") + tuple(
    f"{key}_{stat}" for key, _ in METRICS for stat in ("mean", "std")
)
"""Columns of ``main.csv``: one row per (eps, method, optimizer) at its selected lr."""

TUNING_COLUMNS: Tuple[str, ...] = (
    "eps", "method", "optimizer", "lr", "gamma", "seed", "val_pgd_best", "val_pgd_last", "val_clean_last", "best_epoch", "collapsed", "selected", "time_s",
)
"""Columns of ``tuning.csv``: one row per tuning run (validation numbers only)."""

RUN_COLUMNS: Tuple[str, ...] = (
    "phase", "eps", "method", "optimizer", "lr", "gamma", "seed", "clean_last", "pgd20_last", "aa_last", "clean_best", "pgd20_best", "aa_best",
    "gap_pgd20", "best_epoch", "val_pgd_best", "val_pgd_last", "collapsed", "time_s", "fraction_above_gamma", "error",
)
"""Columns of ``runs.csv``: one row per final or gamma-study run (``collapsed`` is the diverged flag)."""

SENSITIVITY_COLUMNS: Tuple[str, ...] = ("eps", "method", "optimizer", "grid", "val_pgd_last", "spread", "collapsed", "runs")
PAIRED_COLUMNS: Tuple[str, ...] = ("eps", "method", "optimizer", "baseline", "metric", "n", "mean_diff", "p_value", "test")
GAMMA_COLUMNS: Tuple[str, ...] = (
    "eps", "gamma", "lr", "seeds", "diverged_share", "val_pgd_best_mean", "val_pgd_best_std", "clean_last_mean", "clean_last_std",
    "pgd20_last_mean", "pgd20_last_std", "pgd20_best_mean", "pgd20_best_std",
)


def label(optimizer: str) -> str:
    """The table name of an optimizer (``engm-input-norm`` -> ``ENGM (input-norm)``)."""
    return OPTIMIZER_LABELS.get(optimizer, optimizer)


def pct(mean: float, std: Optional[float] = None, percent: bool = True) -> str:
    """``36.9±1.2`` (percent) or ``12.0±0.4``; ``-`` for NaN."""
    if not math.isfinite(mean):
        return "-"
    scale = 100 if percent else 1
    return f"{scale * mean:.1f}" + (f"±{scale * std:.1f}" if std is not None and math.isfinite(std) else "")


def _group(rows: Sequence[Dict[str, Any]], keys: Sequence[str]) -> Dict[Tuple[str, ...], List[Dict[str, Any]]]:
    groups: Dict[Tuple[str, ...], List[Dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(str(row[k]) for k in keys), []).append(row)
    return groups


def summarize_final(final_rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row of :data:`MAIN_COLUMNS` per (eps, method, optimizer, lr, gamma); means over the finite values of the seeds."""
    summary = []
    for members in _group(final_rows, ("eps", "method", "optimizer", "lr", "gamma")).values():
        out = {k: members[0][k] for k in ("eps", "method", "optimizer", "lr", "gamma")}
        out["seeds"] = len(members)
        out["diverged_share"] = sum(bool(m["collapsed"]) for m in members) / len(members)
        for key, _ in METRICS:
            out[f"{key}_mean"], out[f"{key}_std"] = mean_std([m[key] for m in members])
        summary.append(out)
    return summary


def main_table(summary: Sequence[Dict[str, Any]]) -> Tuple[List[str], List[List[str]]]:
    """Header and formatted rows of the main table."""
    header = ["eps", "method", "optimizer", "selected lr", "seeds"] + [title for _, title in METRICS] + ["diverged"]
    rows = []
    for r in summary:
        cells = [f"{r['eps']:g}", r["method"], label(r["optimizer"]), f"{r['lr']:g}", str(r["seeds"])]
        cells += [pct(r[f"{key}_mean"], r[f"{key}_std"], key not in NOT_PERCENT) for key, _ in METRICS]
        rows.append(cells + [f"{r['diverged_share']:.0%}"])
    return header, rows


def tuning_rows(tuning: Sequence[Dict[str, Any]], selected: Dict[Setting, Optional[float]]) -> List[Dict[str, Any]]:
    """The tuning runs as :data:`TUNING_COLUMNS` rows, with ``selected`` marking the chosen lr."""
    return [{**{k: r.get(k) for k in TUNING_COLUMNS}, "selected": selected.get((float(r["eps"]), r["method"], r["optimizer"])) == r["lr"]} for r in tuning]


def tuning_table(rows: Sequence[Dict[str, Any]]) -> Tuple[List[str], List[List[str]]]:
    """Header and formatted rows of the tuning grid (``*``: selected, ``collapsed``: not eligible)."""
    header = ["eps", "method", "optimizer", "lr", "val PGD (best)", "val PGD (last)", "val clean (last)", "best epoch", "status"]
    formatted = [
        [f"{r['eps']:g}", r["method"], label(r["optimizer"]), f"{r['lr']:g}", pct(r["val_pgd_best"]), pct(r["val_pgd_last"]), pct(r["val_clean_last"]),
         str(r["best_epoch"]), "selected" if r["selected"] else ("collapsed" if r["collapsed"] else "")]
        for r in rows
    ]
    return header, formatted


def sensitivity(tuning: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per (eps, method, optimizer): final (last-checkpoint) validation PGD over the lr grid, its spread ``max - min`` and collapse count."""
    out = []
    for members in _group(tuning, ("eps", "method", "optimizer")).values():
        points = sorted((float(m["lr"]), float(m["val_pgd_last"])) for m in members)
        finite = [v for _, v in points if math.isfinite(v)]
        out.append({
            "eps": members[0]["eps"], "method": members[0]["method"], "optimizer": members[0]["optimizer"],
            "grid": " ".join(f"{lr:g}" for lr, _ in points), "val_pgd_last": " ".join(f"{v:.4f}" for _, v in points),
            "spread": max(finite) - min(finite) if finite else float("nan"),
            "collapsed": sum(bool(m["collapsed"]) for m in members), "runs": len(members),
            "points": points,
        })
    return out


def sensitivity_table(spread: Sequence[Dict[str, Any]]) -> Tuple[List[str], List[List[str]]]:
    """Header and formatted rows of the sensitivity summary (percentage points)."""
    header = ["eps", "method", "optimizer", "final val PGD per lr", "spread max-min", "collapsed"]
    rows = [
        [f"{s['eps']:g}", s["method"], label(s["optimizer"]), ", ".join(f"{lr:g}: {pct(v)}" for lr, v in s["points"]),
         pct(s["spread"]), f"{s['collapsed']}/{s['runs']}"]
        for s in spread
    ]
    return header, rows


def paired_table(tests: Sequence[Dict[str, Any]]) -> Tuple[List[str], List[List[str]]]:
    """Header and formatted rows of the paired tests (difference in percentage points)."""
    header = ["eps", "method", "comparison", "metric", "n", "mean diff (pp)", "p-value", "test"]
    titles = dict(METRICS)
    rows = [
        [f"{t['eps']:g}", t["method"], f"{label(t['optimizer'])} - {label(t['baseline'])}", titles.get(t["metric"], t["metric"]), str(t["n"]),
         f"{100 * t['mean_diff']:+.1f}" if math.isfinite(t["mean_diff"]) else "-", f"{t['p_value']:.3g}" if math.isfinite(t["p_value"]) else "-", t["test"]]
        for t in tests
    ]
    return header, rows


def gamma_study(final_rows: Sequence[Dict[str, Any]], gamma_rows: Sequence[Dict[str, Any]]) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """Per eps and gamma (:data:`GAMMA_COLUMNS`) of PGD-AT exact ENGM (the base gamma from the final phase), and per eps the verdict of :func:`gamma_verdict`."""
    rows = [r for r in final_rows if r["method"] == "pgd-at" and r["optimizer"] == "engm"] + list(gamma_rows)
    if not gamma_rows:
        return [], []
    summary, verdicts = [], []
    for eps in dict.fromkeys(float(r["eps"]) for r in rows):
        at_eps = [r for r in rows if float(r["eps"]) == eps]
        for members in _group(at_eps, ("gamma",)).values():
            out: Dict[str, Any] = {"eps": eps, "gamma": members[0]["gamma"], "lr": members[0]["lr"], "seeds": len(members)}
            out["diverged_share"] = sum(bool(m["collapsed"]) for m in members) / len(members)
            for key in ("val_pgd_best", "clean_last", "pgd20_last", "pgd20_best"):
                out[f"{key}_mean"], out[f"{key}_std"] = mean_std([m[key] for m in members])
            summary.append(out)
        verdicts.append({"eps": eps, **gamma_verdict(at_eps)})
    summary.sort(key=lambda r: (r["eps"], isinstance(r["gamma"], str), r["gamma"] if not isinstance(r["gamma"], str) else 0.0))
    return summary, verdicts


def gamma_table(summary: Sequence[Dict[str, Any]]) -> Tuple[List[str], List[List[str]]]:
    """Header and formatted rows of the gamma study."""
    header = ["eps", "gamma", "lr", "seeds", "val PGD (best)", "clean (last)", "PGD-20 (last)", "PGD-20 (best)", "diverged"]
    rows = [
        [f"{r['eps']:g}", gamma_text(r["gamma"]), f"{r['lr']:g}", str(r["seeds"])]
        + [pct(r[f"{key}_mean"], r[f"{key}_std"]) for key in ("val_pgd_best", "clean_last", "pgd20_last", "pgd20_best")]
        + [f"{r['diverged_share']:.0%}"]
        for r in summary
    ]
    return header, rows


def verdict_text(verdict: Dict[str, Any]) -> str:
    """One sentence: the tuned gamma and its test accuracy."""
    if verdict["tuned_gamma"] is None:
        return f"eps {verdict['eps']:g}: no finite gamma-study run, no tuned gamma."
    return (f"eps {verdict['eps']:g}: tuned gamma (best mean validation PGD) = {verdict['tuned_gamma']:g}, "
            f"test PGD-20 (last) {pct(verdict['tuned_test_mean'], verdict['tuned_test_std'])}.")
