"""The benchmark's decisions: the collapse rule, lr selection on validation, the tuned fixed gamma, paired tests across seeds.

Everything here is a pure function of run rows (dicts made by
:mod:`engm_opacus.experiments.bench_runs`), so it is unit-tested without training.

* **Collapse**: a run collapsed (diverged) when a training loss is non-finite, its optimizer
  raised on non-finite values, or its final validation clean accuracy is at most
  :data:`COLLAPSE_FACTOR` ``/ num_classes`` (near chance: 0.15 on 10 classes).
* **Selection** (:func:`select_lrs`): per (eps, AT method, optimizer) the learning rate whose
  tuning run has the highest validation PGD accuracy of its best checkpoint; ties go to the
  smaller lr; collapsed runs are not eligible. It reads only :data:`SELECTION_KEYS` (validation
  numbers), never a test metric.
* **Tuned gamma** (:func:`gamma_verdict`): among the study's gammas, the one with the highest
  mean validation PGD (best checkpoint) over seeds.
* **Paired test** (:func:`paired_test`): the same seeds of two optimizers; ``scipy.stats.ttest_rel``
  when scipy is installed (the ``[dev]`` extra), else an exact sign-flip permutation test.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

COLLAPSE_FACTOR = 1.5
"""A run collapsed when its final validation clean accuracy is ``<= COLLAPSE_FACTOR / num_classes``."""

SELECTION_KEYS: Tuple[str, ...] = ("eps", "method", "optimizer", "lr", "val_pgd_best", "collapsed")
"""The only fields of a tuning row that :func:`select_lrs` reads (all from the validation split)."""

Setting = Tuple[float, str, str]
"""(eps, AT method, optimizer)."""


def collapse_threshold(num_classes: int) -> float:
    """Validation clean accuracy at or below which a run counts as collapsed: ``COLLAPSE_FACTOR / num_classes``."""
    return COLLAPSE_FACTOR / num_classes


def is_collapsed(history: Sequence[Dict[str, Any]], num_classes: int) -> bool:
    """Whether a run's epoch records show divergence or collapse (no records at all counts as collapsed)."""
    if not history:
        return True
    if any(not math.isfinite(float(record.get("train_loss", float("nan")))) for record in history):
        return True
    final_clean = float(history[-1].get("val_clean_acc", float("nan")))
    return not math.isfinite(final_clean) or final_clean <= collapse_threshold(num_classes)


def select_lrs(tuning_rows: Sequence[Dict[str, Any]]) -> Dict[Setting, Optional[float]]:
    """Per (eps, method, optimizer): the selected lr (``None`` when every lr of the grid collapsed).

    Highest ``val_pgd_best`` among runs that did not collapse and have a finite value; ties go to
    the smaller lr. Only :data:`SELECTION_KEYS` are read (the rows are projected onto them first).
    """
    view = [{key: row[key] for key in SELECTION_KEYS} for row in tuning_rows]
    candidates: Dict[Setting, List[Tuple[float, float]]] = {}
    for row in view:
        options = candidates.setdefault((float(row["eps"]), row["method"], row["optimizer"]), [])
        score = float(row["val_pgd_best"])
        if not row["collapsed"] and math.isfinite(score):
            options.append((score, -float(row["lr"])))
    return {setting: -max(options)[1] if options else None for setting, options in candidates.items()}


def _finite(values: Sequence[Any]) -> List[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_std(values: Sequence[Any]) -> Tuple[float, float]:
    """Mean and sample std (``ddof=1``; 0 for one value) of the finite values; NaNs if none."""
    finite = _finite(values)
    if not finite:
        return float("nan"), float("nan")
    return float(np.mean(finite)), float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0


def gamma_verdict(rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The tuned gamma (validation) and its test PGD-20 (last).

    ``rows``: PGD-AT exact-ENGM runs of one eps at one lr, one per (gamma, seed), with
    ``val_pgd_best`` and ``pgd20_last``. Returns ``tuned_gamma`` (``None`` without a finite run),
    ``tuned_val`` and ``tuned_test_mean`` / ``_std``.
    """
    by_gamma: Dict[Any, List[Dict[str, Any]]] = {}
    for row in rows:
        by_gamma.setdefault(row["gamma"], []).append(row)
    scored = [(mean_std([r["val_pgd_best"] for r in by_gamma[g]])[0], -float(g), g) for g in by_gamma]
    scored = [s for s in scored if math.isfinite(s[0])]
    out: Dict[str, Any] = {"tuned_gamma": None, "tuned_val": float("nan"), "tuned_test_mean": float("nan"), "tuned_test_std": float("nan")}
    if scored:
        tuned_val, _, tuned = max(scored)  # ties: the smaller gamma
        out.update(tuned_gamma=float(tuned), tuned_val=tuned_val)
        out["tuned_test_mean"], out["tuned_test_std"] = mean_std([r["pgd20_last"] for r in by_gamma[tuned]])
    return out


def sign_flip_test(differences: Sequence[float], exact_up_to: int = 16, draws: int = 20000, seed: int = 0) -> float:
    """Two-sided p-value of the paired sign-flip permutation test of ``mean(differences) == 0``.

    Exact enumeration of all ``2^n`` sign patterns for ``n <= exact_up_to``, else ``draws`` random ones.
    """
    d = np.asarray(differences, dtype=float)
    observed = abs(d.mean())
    if len(d) <= exact_up_to:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
    else:
        signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(draws, len(d)))
    means = np.abs((signs * d).mean(axis=1))
    return float(np.mean(means >= observed - 1e-12))


def paired_test(a: Sequence[float], b: Sequence[float]) -> Dict[str, Any]:
    """Paired comparison of ``a`` vs ``b`` (same seeds, same order): ``n``, ``mean_diff`` (a - b), ``p_value``, ``test``.

    Pairs with a non-finite member are dropped. ``p_value`` is NaN with fewer than 2 pairs (and
    from the t-test when all differences are equal).
    """
    pairs = [(float(x), float(y)) for x, y in zip(a, b) if math.isfinite(float(x)) and math.isfinite(float(y))]
    n = len(pairs)
    out: Dict[str, Any] = {"n": n, "mean_diff": float("nan"), "p_value": float("nan"), "test": "-"}
    if n == 0:
        return out
    xs, ys = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    out["mean_diff"] = float((xs - ys).mean())
    if n < 2:
        return out
    try:
        from scipy.stats import ttest_rel
    except ImportError:
        out.update(p_value=sign_flip_test(xs - ys), test="sign-flip")
    else:
        out.update(p_value=float(ttest_rel(xs, ys).pvalue), test="paired t")
    return out


def paired_comparisons(final_rows: Sequence[Dict[str, Any]], metrics: Sequence[str] = ("pgd20_last", "aa_last")) -> List[Dict[str, Any]]:
    """Per eps and AT method: ENGM vs MSGD and ENGM (input-norm) vs MSGD on each metric, paired by seed."""
    out = []
    settings = dict.fromkeys((float(r["eps"]), r["method"]) for r in final_rows)
    for eps, method in settings:
        def by_seed(optimizer: str) -> Dict[int, Dict[str, Any]]:
            return {r["seed"]: r for r in final_rows if float(r["eps"]) == eps and r["method"] == method and r["optimizer"] == optimizer}

        baseline = by_seed("msgd")
        for optimizer in ("engm", "engm-input-norm"):
            runs = by_seed(optimizer)
            seeds = sorted(set(runs) & set(baseline))
            if not seeds:
                continue
            for metric in metrics:
                test = paired_test([runs[s][metric] for s in seeds], [baseline[s][metric] for s in seeds])
                out.append({"eps": eps, "method": method, "optimizer": optimizer, "baseline": "msgd", "metric": metric, **test})
    return out
