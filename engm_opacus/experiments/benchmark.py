"""Does ENGM help? ENGM vs MSGD across AT methods, seeds and hyper-parameters.

One benchmark, three parts, all trained with :func:`engm_opacus.training.loop.train` under the
same schedule (only the outer optimizer differs inside a comparison):

* **main**: AT methods (PGD-AT, TRADES, MART, AWP+PGD-AT) x optimizers (``msgd``; ``engm``:
  exact per-example norms; ``engm-input-norm``: the input-norm variant,
  ``make_engm(variant="input-norm")``; tables call them MSGD, ENGM, ENGM (input-norm)) x seeds.
  Per run: clean and PGD-20 accuracy of the last and the best checkpoint on the test split
  (from the training loop), AutoAttack accuracy of both on the first ``autoattack_examples``
  test examples (AutoAttack "standard" through ``pyautoattack``, the ``[eval]`` extra,
  :func:`engm_opacus.training.evaluation.evaluate`), the
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

Learning rates: each optimizer at its own default, :data:`engm_opacus.training.config.DEFAULT_LR`
(MSGD 0.1, the standard AT learning rate; ENGM 0.5 with ``gamma=1``). The two are not
comparable numbers: ENGM's direction ``(1/B) sum_i g_i / max(||g_i||, gamma)`` has norm
``<= 1/gamma`` and is smaller than MSGD's mean gradient whenever per-example norms exceed
``gamma``. ``lr_msgd`` / ``lr_engm`` override them, and the sensitivity sweep shows each
optimizer at ``lr x lr_multipliers`` of its own default.

Each run has its own folder ``out_dir/runs/<name>-<config hash>``. A run whose ``bench.json``
matches its config is reused; a run with ``result.json`` only gets its AutoAttack evaluation;
a run with ``last.pt`` only is resumed through the training loop's ``resume``. The tables,
CSV files and plots are made by :mod:`engm_opacus.experiments.benchmark_report`.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from engm_opacus.at.losses import at_method_names
from engm_opacus.experiments.benchmark_report import budget_text, report
from engm_opacus.training.checkpoints import load_trained_model
from engm_opacus.training.config import DEFAULT_LR, RESUMABLE_CHANGES, TrainConfig
from engm_opacus.training.extras import require
from engm_opacus.training.data import limit, load_dataset, make_loader
from engm_opacus.training.evaluation import evaluate
from engm_opacus.training.logs import write_json
from engm_opacus.training.loop import train
from engm_opacus.training.runtime import resolve_device

OPTIMIZER_CHOICES: Tuple[str, ...] = ("msgd", "engm", "engm-input-norm")
"""Benchmark optimizers: ``TrainConfig.optimizer`` names (MSGD, exact ENGM, ENGM (input-norm)), in table order."""

DEFAULT_METHODS: Tuple[str, ...] = ("pgd-at", "trades", "mart", "awp-pgd-at")

@dataclass
class BenchConfig:
    """What to run.

    Attributes:
        methods: AT methods (names of :func:`engm_opacus.at.losses.get_at_loss`).
        optimizers: subset of :data:`OPTIMIZER_CHOICES`.
        seeds: training seeds of every setting of the main part.
        sweep_seeds: how many of ``seeds`` (the first ones) the sensitivity and gamma sweeps use.
        lr_multipliers, wd_multipliers: sensitivity factors (empty: no sensitivity sweep).
        gamma_multipliers: gamma sweep factors (empty: none).
        lr_msgd, lr_engm: base learning rates (``None``: :data:`~engm_opacus.training.config.DEFAULT_LR` of each;
            ``lr_engm`` applies to both ENGM variants).
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
    lrs = {name: (bench.lr_msgd if name == "msgd" else bench.lr_engm) or DEFAULT_LR[name] for name in OPTIMIZER_CHOICES}

    def spec(part: str, method: str, optimizer: str, seed: int, aa: int, lr_mult: float = 1.0, wd_mult: float = 1.0, g_mult: float = 1.0) -> RunSpec:
        config = replace(
            base, optimizer=optimizer, at_method=method, seed=seed, lr=lrs[optimizer] * lr_mult,
            weight_decay=base.weight_decay * wd_mult, gamma=base.gamma * g_mult, progress=False,
        )
        return RunSpec(part, optimizer, config, aa, lr_mult * wd_mult * g_mult)

    aa_seeds = list(bench.seeds)[: bench.autoattack_seeds] if bench.autoattack_seeds else list(bench.seeds)
    sweep_seeds = list(bench.seeds)[: bench.sweep_seeds] if bench.sweep_seeds else list(bench.seeds)
    sweep_optimizers = [o for o in ("msgd", "engm") if o in bench.optimizers]
    specs: List[RunSpec] = []
    for seed in bench.seeds:  # seed-major: an interrupted benchmark has complete tables for its first seeds
        aa = bench.autoattack_examples if seed in aa_seeds else 0
        specs += [spec("main", method, optimizer, seed, aa) for method in bench.methods for optimizer in bench.optimizers]
        if seed not in sweep_seeds:
            continue
        for optimizer in sweep_optimizers:
            specs += [spec("sensitivity-lr", "pgd-at", optimizer, seed, 0, lr_mult=m) for m in bench.lr_multipliers]
            specs += [spec("sensitivity-wd", "pgd-at", optimizer, seed, 0, wd_mult=m) for m in bench.wd_multipliers]
        if "engm" in bench.optimizers:
            specs += [spec("gamma", "pgd-at", "engm", seed, 0, g_mult=m) for m in bench.gamma_multipliers]
    return specs


def autoattack_eval(config: TrainConfig, checkpoint: Path, examples: int) -> float:
    """AutoAttack accuracy of a checkpoint's model on the first ``examples`` test examples (PGD start and AutoAttack seeded by the run's seed)."""
    device = resolve_device(config.device)
    model, _, _ = load_trained_model(checkpoint, device)
    splits = load_dataset(config.dataset, config.data_dir, split_seed=0)
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
        "gamma": config.gamma if config.uses_engm else float("nan"),
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
    write_json({"config": asdict(config), "autoattack_examples": spec.autoattack_examples, "row": row}, bench_file)
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


def run_benchmark(bench: BenchConfig, console: Optional[Console] = None) -> Dict[str, Any]:
    """Validate, run every run (reusing finished ones), report; return :func:`~engm_opacus.experiments.benchmark_report.report`'s dict plus ``rows``."""
    bench.validate()
    require("matplotlib", "The benchmark's plots")  # missing extras fail here, before any run
    if bench.autoattack_examples:
        require("pyautoattack", "The benchmark's AutoAttack evaluation")
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
