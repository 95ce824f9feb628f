"""Does ENGM help? ENGM vs MSGD across AT methods, seeds and hyper-parameters.

One benchmark, three parts, all trained with :func:`engm_opacus.train` under the same
schedule (only the outer optimizer differs inside a comparison):

* **main**: AT methods (PGD-AT, TRADES, MART, AWP+PGD-AT) x optimizers (``msgd``;
  ``engm-exact``: exact per-example norms, Opacus hooks; ``engm-cheap``: the input-gradient
  norm variant, ``make_engm(variant="input-norm")``) x seeds. Per run: clean and PGD-20
  accuracy of the last and the best checkpoint on the test split (from the training loop),
  AutoAttack accuracy of both on the first ``autoattack_examples`` test examples
  (``torchattacks``' AutoAttack "standard", :func:`engm_opacus.evaluation.evaluate`), the
  robust-overfitting gap ``PGD-20(best) - PGD-20(last)`` and the training time.
* **sensitivity** (PGD-AT, MSGD vs exact ENGM): learning rate x ``lr_multipliers`` at the
  default weight decay, and weight decay x ``wd_multipliers`` at the default learning rate
  (one factor at a time; the x1 point is the main run). The spread of the final (last
  checkpoint) PGD-20 accuracy over each sweep is ``max - min`` and the standard deviation of
  the per-setting seed means.
* **gamma** (PGD-AT, exact ENGM): ``gamma x gamma_multipliers``.

Aggregation: mean and sample standard deviation (``ddof=1``; 0 with one seed) over seeds.
"Best" is the epoch with the highest validation PGD accuracy (the training loop's
``best.pt``); when the best epoch is the last one, its evaluations are reused.
``time_s`` is the sum of the per-epoch times (training plus per-epoch validation; final
test evaluation and AutoAttack excluded), so it is unaffected by interruptions.

Learning rates: each optimizer at its own default, :data:`engm_opacus.training.DEFAULT_LR`
(MSGD 0.1, the standard AT learning rate; ENGM 0.5 with ``gamma=1``). The two are not
comparable numbers: ENGM's direction ``(1/B) sum_i g_i / max(||g_i||, gamma)`` has norm
``<= 1/gamma`` and is smaller than MSGD's mean gradient whenever per-example norms exceed
``gamma``. ``lr_msgd`` / ``lr_engm`` override them, and the sensitivity sweep shows each
optimizer at ``lr x lr_multipliers`` of its own default.

Each run has its own folder ``out_dir/runs/<name>-<config hash>``. A run whose ``bench.json``
matches its config is reused; a run with ``result.json`` only gets its AutoAttack evaluation;
a run with ``last.pt`` only is resumed through the training loop's ``resume``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from engm_opacus.checkpoints import atomic_write_text, load_checkpoint
from engm_opacus.data import limit, load_dataset, make_loader
from engm_opacus.evaluation import evaluate
from engm_opacus.losses import at_method_names
from engm_opacus.models import build_model
from engm_opacus.training import DEFAULT_LR, RESUMABLE_CHANGES, TrainConfig, resolve_device, train

OPTIMIZER_CHOICES: Tuple[str, ...] = ("msgd", "engm-exact", "engm-cheap")
"""Benchmark optimizer names: MSGD, exact ENGM (Opacus hooks), cheap ENGM (``variant="input-norm"``)."""

DEFAULT_METHODS: Tuple[str, ...] = ("pgd-at", "trades", "mart", "awp-pgd-at")

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


@dataclass
class BenchConfig:
    """What to run.

    Attributes:
        methods: AT methods (names of :func:`engm_opacus.losses.get_at_loss`).
        optimizers: subset of :data:`OPTIMIZER_CHOICES`.
        seeds: training seeds of every setting of the main part.
        sweep_seeds: how many of ``seeds`` (the first ones) the sensitivity and gamma sweeps use.
        lr_multipliers, wd_multipliers: sensitivity factors (empty: no sensitivity sweep).
        gamma_multipliers: gamma sweep factors (empty: none).
        lr_msgd, lr_engm: base learning rates (``None``: :data:`~engm_opacus.training.DEFAULT_LR` of each).
        autoattack_examples: test examples AutoAttack runs on (0: AutoAttack off).
        autoattack_seeds: AutoAttack only for the first this many seeds (``None``: all).
        jobs: runs trained in parallel (separate processes, 1 torch thread each).
        out_dir: results folder.
        base: the :class:`TrainConfig` every run starts from (schedule, budgets, data, model).
        quick: label the output as quick mode.
    """

    methods: Sequence[str] = DEFAULT_METHODS
    optimizers: Sequence[str] = OPTIMIZER_CHOICES
    seeds: Sequence[int] = (0, 1, 2)
    sweep_seeds: Optional[int] = None
    lr_multipliers: Sequence[float] = (0.5, 1.0, 2.0)
    wd_multipliers: Sequence[float] = (0.1, 1.0, 10.0)
    gamma_multipliers: Sequence[float] = (0.25, 1.0, 4.0)
    lr_msgd: Optional[float] = None
    lr_engm: Optional[float] = None
    autoattack_examples: int = 1000
    autoattack_seeds: Optional[int] = None
    jobs: int = 1
    out_dir: str = "benchmarks/results/engm_vs_msgd"
    base: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=30, progress=False))
    quick: bool = False

    def validate(self) -> "BenchConfig":
        """Raise ``ValueError`` naming the fix for any bad field; return ``self``."""
        unknown = [m for m in self.methods if m not in at_method_names()]
        if unknown or not self.methods:
            raise ValueError(f"Unknown or no AT methods {unknown}. Fix: use some of {', '.join(at_method_names())}.")
        bad = [o for o in self.optimizers if o not in OPTIMIZER_CHOICES]
        if bad or not self.optimizers:
            raise ValueError(f"Unknown or no optimizers {bad}. Fix: use some of {', '.join(OPTIMIZER_CHOICES)}.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct ints, got {list(self.seeds)}. Fix: e.g. --seeds 0 1 2.")
        for name in ("lr_multipliers", "wd_multipliers", "gamma_multipliers"):
            values = getattr(self, name)
            if any(not math.isfinite(v) or v <= 0 for v in values):
                raise ValueError(f"{name} must be positive numbers, got {list(values)}.")
        for name in ("sweep_seeds", "autoattack_seeds"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}.")
        if self.autoattack_examples < 0 or self.jobs < 1:
            raise ValueError(
                f"autoattack_examples must be >= 0 (0 turns AutoAttack off) and jobs >= 1, got {self.autoattack_examples}, {self.jobs}."
            )
        for lr in (self.lr_msgd, self.lr_engm):
            if lr is not None and (not math.isfinite(lr) or lr <= 0):
                raise ValueError(f"lr_msgd / lr_engm must be > 0, got {lr}.")
        replace(self.base).validate()  # on a copy: validate() resolves lr=None to the ENGM default
        return self


@dataclass(frozen=True)
class RunSpec:
    """One training run of the benchmark: its part, optimizer label, config, AutoAttack budget and sweep factor."""

    part: str
    optimizer: str
    config: TrainConfig
    autoattack_examples: int
    factor: float = 1.0


def optimizer_config(base: TrainConfig, optimizer: str) -> TrainConfig:
    """``base`` with the fields of a benchmark optimizer name set (see :data:`OPTIMIZER_CHOICES`)."""
    if optimizer == "msgd":
        return replace(base, optimizer="msgd", engm_variant=None)
    if optimizer == "engm-exact":
        return replace(base, optimizer="engm", engm_variant=None)
    if optimizer == "engm-cheap":
        return replace(base, optimizer="engm", engm_variant="input-norm")
    raise ValueError(f"Unknown benchmark optimizer {optimizer!r}. Fix: use one of {', '.join(OPTIMIZER_CHOICES)}.")


def config_key(config: TrainConfig) -> str:
    """A short hash of the config fields that define the run (not out_dir, resume, device, progress, overwrite)."""
    fields = {k: v for k, v in asdict(config).items() if k not in RESUMABLE_CHANGES}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:10]


def run_name(spec: RunSpec) -> str:
    """``<method>-<optimizer>-lr<lr>-wd<wd>-g<gamma>-s<seed>-<config hash>``."""
    c = spec.config
    return f"{c.at_method}-{spec.optimizer}-lr{c.lr:g}-wd{c.weight_decay:g}-g{c.gamma:g}-s{c.seed}-{config_key(c)}"


def plan(bench: BenchConfig) -> List[RunSpec]:
    """Every run of the benchmark, seed by seed (a run shared by several parts is listed once per part, trained once)."""
    base = bench.base
    lr_engm = bench.lr_engm or DEFAULT_LR["engm"]
    lrs = {"msgd": bench.lr_msgd or DEFAULT_LR["msgd"], "engm-exact": lr_engm, "engm-cheap": lr_engm}

    def spec(part: str, method: str, optimizer: str, seed: int, aa: int, lr_mult: float = 1.0, wd_mult: float = 1.0, g_mult: float = 1.0) -> RunSpec:
        config = replace(
            optimizer_config(base, optimizer), at_method=method, seed=seed, lr=lrs[optimizer] * lr_mult,
            weight_decay=base.weight_decay * wd_mult, gamma=base.gamma * g_mult, progress=False,
        )
        return RunSpec(part, optimizer, config, aa, lr_mult * wd_mult * g_mult)

    aa_seeds = list(bench.seeds)[: bench.autoattack_seeds] if bench.autoattack_seeds else list(bench.seeds)
    sweep_seeds = list(bench.seeds)[: bench.sweep_seeds] if bench.sweep_seeds else list(bench.seeds)
    sweep_optimizers = [o for o in ("msgd", "engm-exact") if o in bench.optimizers]
    specs: List[RunSpec] = []
    for seed in bench.seeds:  # seed-major: an interrupted benchmark has complete tables for its first seeds
        aa = bench.autoattack_examples if seed in aa_seeds else 0
        specs += [spec("main", method, optimizer, seed, aa) for method in bench.methods for optimizer in bench.optimizers]
        if seed not in sweep_seeds:
            continue
        for optimizer in sweep_optimizers:
            specs += [spec("sensitivity-lr", "pgd-at", optimizer, seed, 0, lr_mult=m) for m in bench.lr_multipliers]
            specs += [spec("sensitivity-wd", "pgd-at", optimizer, seed, 0, wd_mult=m) for m in bench.wd_multipliers]
        if "engm-exact" in bench.optimizers:
            specs += [spec("gamma", "pgd-at", "engm-exact", seed, 0, g_mult=m) for m in bench.gamma_multipliers]
    return specs


def autoattack_eval(config: TrainConfig, checkpoint: Path, examples: int) -> float:
    """AutoAttack accuracy of a checkpoint's model on the first ``examples`` test examples."""
    device = resolve_device(config.device)
    splits = load_dataset(config.dataset, config.data_dir, split_seed=0)
    model = build_model(config.model, num_classes=splits.num_classes, in_channels=splits.in_channels, norm=config.norm, width=config.width)
    model.load_state_dict(load_checkpoint(checkpoint, map_location=device)["model"])
    model.to(device).eval()
    loader = make_loader(limit(splits.test, examples), config.batch_size, shuffle=False)
    result = evaluate(
        model, loader, eps=config.eps, step_size=config.step_size, pgd_steps=config.test_pgd_steps,
        autoattack=True, device=device, max_examples=examples, seed=config.seed,
    )
    return float(result["autoattack_acc"])


def _stored_config_matches(data: Dict[str, Any], config: TrainConfig) -> bool:
    stored = {k: v for k, v in data.get("config", {}).items() if k not in RESUMABLE_CHANGES}
    wanted = {k: v for k, v in json.loads(json.dumps(asdict(config))).items() if k not in RESUMABLE_CHANGES}
    return stored == wanted


def run_one(spec: RunSpec, runs_dir: str) -> Dict[str, Any]:
    """Train (or reuse / resume) one run and return its row (GROUP_KEYS, seed, per-run metrics).

    Reuse order: ``bench.json`` with the same config and AutoAttack budget; else
    ``result.json`` with the same config (AutoAttack is computed); else ``last.pt`` (the
    run is resumed); else a fresh run.
    """
    run_dir = Path(runs_dir) / run_name(spec)
    config = replace(spec.config, out_dir=str(run_dir))
    bench_file, result_file, last = run_dir / "bench.json", run_dir / "result.json", run_dir / "last.pt"
    if bench_file.exists():
        row = json.loads(bench_file.read_text())
        if row.get("autoattack_examples") == spec.autoattack_examples and _stored_config_matches(row, config):
            return {**row["row"], "part": spec.part, "reused": True}
    result = json.loads(result_file.read_text()) if result_file.exists() else None
    if result is None or not _stored_config_matches(result, config):
        resume = str(last) if last.exists() else None
        result = train(replace(config, resume=resume)).to_json()
    history = result["history"]
    last_epoch = len(history)
    row: Dict[str, Any] = {
        "part": spec.part,
        "dataset": config.dataset,
        "method": config.at_method,
        "optimizer": spec.optimizer,
        "lr": config.lr,
        "weight_decay": config.weight_decay,
        "gamma": config.gamma if config.optimizer == "engm" else float("nan"),
        "epochs": config.epochs,
        "seed": config.seed,
        "clean_last": result["test_last"]["clean_acc"],
        "pgd20_last": result["test_last"]["pgd_acc"],
        "clean_best": result["test_best"]["clean_acc"],
        "pgd20_best": result["test_best"]["pgd_acc"],
        "gap_pgd20": result["test_best"]["pgd_acc"] - result["test_last"]["pgd_acc"],
        "best_epoch": result["best_epoch"],
        "val_gap": result["robust_overfitting_gap"],
        "time_s": float(sum(record["time_s"] for record in history)),
        "val_pgd_history": [record["val_pgd_acc"] for record in history],
        "fraction_above_gamma": history[-1].get("engm_mean_fraction_above_gamma", float("nan")),
        "direction_norm": history[-1].get("engm_mean_direction_norm", float("nan")),
        "aa_last": float("nan"),
        "aa_best": float("nan"),
        "reused": False,
    }
    if spec.autoattack_examples > 0:
        row["aa_last"] = autoattack_eval(config, last, spec.autoattack_examples)
        row["aa_best"] = row["aa_last"] if result["best_epoch"] == last_epoch else autoattack_eval(
            config, run_dir / "best.pt", spec.autoattack_examples
        )
    stored = {"config": asdict(config), "autoattack_examples": spec.autoattack_examples, "row": row}
    atomic_write_text(json.dumps(stored, indent=2) + "\n", bench_file)
    return row


def _worker_init() -> None:
    torch.set_num_threads(1)


def run_all(bench: BenchConfig, console: Optional[Console] = None) -> List[Dict[str, Any]]:
    """Run (or reuse) every run of :func:`plan`; return the rows in plan order."""
    console = console or Console()
    specs = plan(bench)
    runs_dir = str(Path(bench.out_dir) / "runs")
    rows: List[Optional[Dict[str, Any]]] = [None] * len(specs)
    unique: Dict[str, List[int]] = {}
    for index, spec in enumerate(specs):
        unique.setdefault(run_name(spec), []).append(index)
    # A run shared by several parts (e.g. the x1 point of a sweep) is trained once, with the largest AutoAttack budget.
    chosen = {name: max((specs[i] for i in indices), key=lambda s: s.autoattack_examples) for name, indices in unique.items()}
    with Progress(
        TextColumn("[bold]runs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}"),
        console=console,
    ) as progress:
        task = progress.add_task("", total=len(unique))

        def store(indices: List[int], row: Dict[str, Any]) -> None:
            for i in indices:
                rows[i] = {**row, "part": specs[i].part, "factor": specs[i].factor}
            progress.update(task, advance=1, description=f"{row['method']} {row['optimizer']} seed {row['seed']}")

        if bench.jobs == 1:
            for name, indices in unique.items():
                store(indices, run_one(chosen[name], runs_dir))
        else:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=bench.jobs, mp_context=context, initializer=_worker_init) as pool:
                futures = {pool.submit(run_one, chosen[name], runs_dir): indices for name, indices in unique.items()}
                for future in as_completed(futures):
                    store(futures[future], future.result())
    return [row for row in rows if row is not None]


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
        cells = [r["method"], r["optimizer"], f"{r['lr']:g}", f"{r['weight_decay']:g}", "-" if not math.isfinite(r["gamma"]) else f"{r['gamma']:g}", f"{r['seeds']} (AA {r['autoattack_runs']})"]
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


def write_csv(rows: Sequence[Dict[str, Any]], columns: Sequence[str], path: Path) -> None:
    """Write ``rows`` (only ``columns``; NaN as empty) atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})
    atomic_write_text(buffer.getvalue(), path)


def plot_robust_over_epochs(rows: Sequence[Dict[str, Any]], path: Path) -> None:
    """Validation PGD accuracy per epoch (mean over seeds, band = +- std), one panel per AT method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [r for r in rows if r["part"] == "main"]
    methods = list(dict.fromkeys(r["method"] for r in main))
    figure, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 3.2), squeeze=False)
    for axis, method in zip(axes[0], methods):
        for optimizer in dict.fromkeys(r["optimizer"] for r in main):
            curves = np.array([r["val_pgd_history"] for r in main if r["method"] == method and r["optimizer"] == optimizer])
            epochs = np.arange(1, curves.shape[1] + 1)
            mean, std = curves.mean(axis=0), curves.std(axis=0)
            axis.plot(epochs, 100 * mean, marker="o", label=optimizer)
            axis.fill_between(epochs, 100 * (mean - std), 100 * (mean + std), alpha=0.2)
        axis.set_title(method)
        axis.set_xlabel("epoch")
        axis.set_ylabel("val PGD acc (%)")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_sweeps(summary: Sequence[Dict[str, Any]], path: Path) -> bool:
    """Final PGD-20 (last) vs the lr, weight-decay and gamma factors (error bars = std over seeds); ``False`` if no sweep ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"sensitivity-lr": "lr / optimizer's default lr", "sensitivity-wd": "weight decay / default", "gamma": "gamma / default gamma"}
    panels = [p for p in labels if any(r["part"] == p for r in summary)]
    if not panels:
        return False
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for axis, part in zip(axes[0], panels):
        factors: set = set()
        for optimizer in dict.fromkeys(r["optimizer"] for r in summary if r["part"] == part):
            points = sorted((r["factor"], r["pgd20_last_mean"], r["pgd20_last_std"]) for r in summary if r["part"] == part and r["optimizer"] == optimizer)
            xs, ys, es = zip(*points)
            factors.update(xs)
            axis.errorbar(xs, [100 * y for y in ys], yerr=[100 * e for e in es], marker="o", capsize=3, label=optimizer)
        axis.set_xscale("log")
        axis.set_xticks(sorted(factors), [f"x{f:g}" for f in sorted(factors)])
        axis.minorticks_off()
        axis.set_xlabel(labels[part])
        axis.set_ylabel("test PGD-20 acc, last (%)")
        axis.set_title(f"PGD-AT: {part.replace('sensitivity-', '')} sweep")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def budget_text(bench: BenchConfig) -> str:
    """One paragraph stating the budget the numbers were measured with."""
    b = bench.base
    aa = (
        f"AutoAttack (torchattacks 'standard') on the first {bench.autoattack_examples} test examples"
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
    write_csv(rows, run_columns, out / "runs.csv")
    write_csv(summary, SUMMARY_COLUMNS, out / "main.csv")
    write_csv(spread, ("axis", "optimizer", "settings", "spread", "std"), out / "sensitivity.csv")
    plot_robust_over_epochs(rows, out / "robust_over_epochs.png")
    has_sweeps = plot_sweeps(summary, out / "sweeps.png")

    budget = budget_text(bench)
    console.print(budget)
    markdown = [f"# ENGM vs MSGD\n\n{budget}\n\nAccuracies in % on the test split, mean ± std over seeds. "
                "Wall time of the whole benchmark: " f"{wall_s:.0f} s.\n"]
    titles = (("main", "AT methods x optimizers"), ("sensitivity", "Sensitivity sweep (PGD-AT)"), ("gamma", "Gamma sweep (PGD-AT, exact ENGM)"))
    for prefix, title in titles:
        header, formatted = table_rows(summary, prefix)
        if formatted:
            console.print(rich_table(title, header, formatted))
            markdown.append(f"\n## {title}\n\n" + markdown_table(header, formatted))
    if spread:
        header = ["axis", "optimizer", "final PGD-20 (last) per setting", "spread max-min", "std"]
        formatted = [[s["axis"], s["optimizer"], s["settings"], f"{100 * s['spread']:.1f}", f"{100 * s['std']:.1f}"] for s in spread]
        console.print(rich_table("Sensitivity: spread of final robust accuracy (percentage points)", header, formatted))
        markdown.append("\n## Spread of final robust accuracy (percentage points)\n\n" + markdown_table(header, formatted))
    markdown.append("\nPlots: `robust_over_epochs.png`" + (", `sweeps.png`" if has_sweeps else "") + "\n")
    atomic_write_text("".join(markdown), out / "results.md")
    console.print(f"Wrote runs.csv, main.csv, sensitivity.csv, results.md and plots to {out} ({wall_s:.0f} s).")
    return {"summary": summary, "sensitivity": spread, "markdown": "".join(markdown)}


def run_benchmark(bench: BenchConfig, console: Optional[Console] = None) -> Dict[str, Any]:
    """Validate, run every run (reusing finished ones), report; return :func:`report`'s dict plus ``rows``."""
    bench.validate()
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=240)  # wide tables stay readable in logs and pipes
    console.print(budget_text(bench))
    load_dataset(bench.base.dataset, bench.base.data_dir, split_seed=0)  # missing CIFAR files fail here, before any run
    started = time.perf_counter()
    rows = run_all(bench, console)
    result = report(bench, rows, time.perf_counter() - started, console)
    return {**result, "rows": rows}


def quick_config(out_dir: Optional[str] = None, **overrides: Any) -> BenchConfig:
    """The ``--quick`` budget for 2 CPU cores (< 15 min): see the numbers below; ``overrides`` replace fields."""
    base = TrainConfig(
        epochs=4, batch_size=64, max_train_examples=640, max_val_examples=64, max_test_examples=200, val_pgd_steps=5,
        pgd_steps=5, progress=False, device="cpu",
    )
    bench = BenchConfig(
        seeds=(0, 1, 2), sweep_seeds=1, autoattack_examples=16, autoattack_seeds=1, jobs=min(2, os.cpu_count() or 1),
        out_dir=out_dir or "benchmarks/results/engm_vs_msgd-quick", base=base, quick=True,
    )
    return replace(bench, **overrides)
