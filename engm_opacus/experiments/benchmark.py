"""Does ENGM help? ENGM vs MSGD: lr tuned on validation, then the selected settings on test over seeds, and a gamma study.

Every run is trained by :func:`engm_opacus.training.loop.train` with the same schedule, data and
threat model; only the outer optimizer (and its lr) differs inside a comparison. Optimizers:
``msgd`` (momentum SGD), ``engm`` (exact per-example norms), ``engm-input-norm``
(``make_engm(variant="input-norm")``); tables call them MSGD, ENGM, ENGM (input-norm).

Protocol (:class:`BenchConfig` holds every number):

1. **Tuning** (phase ``tune``): per eps, AT method and optimizer, every lr of the optimizer's
   grid (``lr_grid_msgd`` / ``lr_grid_engm``, ENGM at the base ``gamma``) is trained once with
   ``tuning_seed`` (distinct from the final seeds). Each run reports its validation PGD accuracy
   per epoch; :func:`~engm_opacus.experiments.bench_select.select_lrs` picks the lr with the
   highest validation PGD of the best checkpoint (ties: smaller lr; collapsed runs excluded).
   No test number of a tuning run is read (see :mod:`engm_opacus.experiments.bench_runs`).
2. **Final** (phase ``final``): each selected setting is re-trained with every seed of
   ``seeds`` and evaluated on the test split: clean and PGD-20 accuracy of the last and the best
   checkpoint (best = highest validation PGD) and AutoAttack (standard, ``pyautoattack``) of both
   on ``autoattack_examples`` test examples (``None``: the whole split).
3. **Gamma study** (phase ``gamma``): PGD-AT with exact ENGM at ENGM's selected lr, for each
   gamma of ``gamma_study`` with the final seeds (test PGD-20, no
   AutoAttack); the base gamma's point is the final phase's run.

Phase 1 finishes before anything of phases 2 and 3 starts. Runs go ``jobs`` at a time in
separate processes (1 torch thread each); finished runs are reused and interrupted ones resumed,
so the same command again continues where it stopped. The report (tables, CSV, Markdown,
plots) is :mod:`engm_opacus.experiments.benchmark_report`.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from rich.console import Console

from engm_opacus.at.losses import at_method_names
from engm_opacus.experiments.bench_runs import RunSpec, run_many, run_name
from engm_opacus.experiments.bench_select import Setting, select_lrs
from engm_opacus.experiments.benchmark_report import budget_text, report
from engm_opacus.training.config import TrainConfig
from engm_opacus.training.data import load_dataset
from engm_opacus.training.extras import require

OPTIMIZER_CHOICES: Tuple[str, ...] = ("msgd", "engm", "engm-input-norm")
"""Benchmark optimizers (``TrainConfig.optimizer`` names), in table order."""

DEFAULT_METHODS: Tuple[str, ...] = ("pgd-at", "trades", "mart", "awp-pgd-at")

STEP_FRACTION = 0.25
"""PGD step size = ``STEP_FRACTION * eps`` (eps 0.2: step 0.05), for training, validation and test attacks."""

SECONDS_PER_EXAMPLE_PASS = 2e-4
"""Rough cost of one forward+backward of one example on one CPU core, for the printed estimate only: the small
CNN on digits measured 1.5e-4 s (a PGD-10 epoch of 1,257 + 180 validation images in 2.4 s, batch 64)."""

AUTOATTACK_SECONDS_PER_EXAMPLE = 0.3
"""Rough AutoAttack (standard) cost per test example on one core, for the estimate only: 96 s for the 360 digits
test images of a small CNN with 25% PGD-20 accuracy at eps 0.2 (Square's 5000 queries dominate)."""

AUTOATTACK_EXAMPLES = 100
"""AutoAttack's default budget: the first 100 of the 360 test images (the whole split costs about 96 s per checkpoint on
one core, 3.2 core-hours for the 120 checkpoints of the final phase; ``--autoattack-examples`` takes any number or all)."""



def _default_base() -> TrainConfig:
    return TrainConfig(epochs=20, batch_size=64, model="small-cnn", pgd_steps=10, val_pgd_steps=10, test_pgd_steps=20, progress=False)


@dataclass
class BenchConfig:
    """What to run.

    Attributes:
        eps: L-infinity radii; each gets the whole protocol (step ``STEP_FRACTION * eps``).
        methods: AT methods (names of :func:`engm_opacus.at.losses.get_at_loss`).
        optimizers: subset of :data:`OPTIMIZER_CHOICES`.
        lr_grid_msgd: MSGD's tuning grid.
        lr_grid_engm: the tuning grid of both ENGM variants (at ``base.gamma``).
        tuning_seed: the seed of every tuning run (not one of ``seeds``).
        seeds: seeds of the final and gamma-study runs.
        gamma_study: ENGM gammas besides ``base.gamma`` for PGD-AT (empty: no study).
        autoattack_examples: test examples for AutoAttack (``None``: all; 0: off).
        jobs: runs trained in parallel (processes, 1 torch thread each).
        out_dir: results folder (runs in ``out_dir/runs``).
        base: the :class:`TrainConfig` every run starts from (data, model, schedule, epochs, budgets, ``gamma``).
        quick: label the output as quick mode.
    """

    eps: Sequence[float] = (0.2,)
    methods: Sequence[str] = DEFAULT_METHODS
    optimizers: Sequence[str] = OPTIMIZER_CHOICES
    lr_grid_msgd: Sequence[float] = (0.01, 0.02, 0.05, 0.1, 0.2)
    lr_grid_engm: Sequence[float] = (0.1, 0.2, 0.5, 1.0, 2.0)
    tuning_seed: int = 1000
    seeds: Sequence[int] = (0, 1, 2, 3, 4)
    gamma_study: Sequence[float] = (0.25, 4.0)
    autoattack_examples: Optional[int] = AUTOATTACK_EXAMPLES
    jobs: int = 2
    out_dir: str = "benchmarks/results/engm_vs_msgd"
    base: TrainConfig = field(default_factory=_default_base)
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
            raise ValueError(f"seeds must be a non-empty list of distinct ints, got {list(self.seeds)}. Fix: e.g. --seeds 0 1 2 3 4.")
        if self.tuning_seed in self.seeds:
            raise ValueError(f"tuning_seed {self.tuning_seed} is one of the final seeds {list(self.seeds)}. Fix: use a distinct one, e.g. 1000.")
        for name in ("eps", "lr_grid_msgd", "lr_grid_engm"):
            values = list(getattr(self, name))
            if not values or any(not math.isfinite(v) or v <= 0 for v in values) or len(set(values)) != len(values):
                raise ValueError(f"{name} must be distinct positive numbers, got {values}.")
        if (self.autoattack_examples is not None and self.autoattack_examples < 0) or self.jobs < 1:
            raise ValueError(
                f"autoattack_examples must be None (all), 0 (off) or positive, and jobs >= 1; got {self.autoattack_examples}, {self.jobs}."
            )
        if len(set(map(str, self.gamma_study))) != len(self.gamma_study):
            raise ValueError(f"gamma_study has repeated values: {list(self.gamma_study)}.")
        for config in [*tuning_configs(self), *(replace(self.base, optimizer="engm", gamma=g) for g in self.gamma_study)]:
            replace(config).validate()  # on a copy: validate() resolves lr=None
        return self


def _config(bench: BenchConfig, eps: float, method: str, optimizer: str, lr: float, seed: int, gamma: Optional[float] = None) -> TrainConfig:
    return replace(
        bench.base, eps=eps, step_size=STEP_FRACTION * eps, at_method=method, optimizer=optimizer, lr=lr, seed=seed,
        gamma=bench.base.gamma if gamma is None else gamma, progress=False,
    )


def lr_grid(bench: BenchConfig, optimizer: str) -> Sequence[float]:
    """The tuning grid of an optimizer."""
    return bench.lr_grid_msgd if optimizer == "msgd" else bench.lr_grid_engm


def tuning_configs(bench: BenchConfig) -> List[TrainConfig]:
    """Phase 1: every (eps, method, optimizer, lr of its grid) at ``tuning_seed``; test capped at one example (never read)."""
    return [
        replace(_config(bench, eps, method, optimizer, lr, bench.tuning_seed), max_test_examples=1)
        for eps in bench.eps for method in bench.methods for optimizer in bench.optimizers for lr in lr_grid(bench, optimizer)
    ]


def final_configs(bench: BenchConfig, selected: Dict[Setting, Optional[float]]) -> List[TrainConfig]:
    """Phase 2: each selected setting with every final seed (seed-major: early seeds complete first); all-collapsed settings skipped."""
    return [
        _config(bench, eps, method, optimizer, lr, seed)
        for seed in bench.seeds
        for (eps, method, optimizer), lr in selected.items() if lr is not None
    ]


def gamma_configs(bench: BenchConfig, selected: Dict[Setting, Optional[float]]) -> List[TrainConfig]:
    """Phase 3: PGD-AT, exact ENGM at its selected lr, every gamma of ``gamma_study`` other than ``base.gamma``, every seed."""
    gammas = [g for g in bench.gamma_study if isinstance(g, str) or float(g) != float(bench.base.gamma)]
    return [
        _config(bench, eps, "pgd-at", "engm", lr, seed, gamma)
        for seed in bench.seeds for gamma in gammas
        for (eps, method, optimizer), lr in selected.items() if (method, optimizer) == ("pgd-at", "engm") and lr is not None
    ]


def plan_sizes(bench: BenchConfig) -> Dict[str, int]:
    """Runs per phase assuming every setting gets a selected lr (phase 3 needs PGD-AT and ENGM)."""
    settings = {(e, m, o): 1.0 for e in bench.eps for m in bench.methods for o in bench.optimizers}
    return {"tune": len(tuning_configs(bench)), "final": len(final_configs(bench, settings)), "gamma": len(gamma_configs(bench, settings))}


def estimate_text(bench: BenchConfig, sizes: Dict[str, int], n_train: int, n_val: int, n_test: int) -> str:
    """The plan size and a rough time estimate (training, and AutoAttack on the last and the best checkpoint)."""
    b = bench.base
    train_examples = min(n_train, b.max_train_examples or n_train)
    val_examples = min(n_val, b.max_val_examples or n_val)
    per_run = b.epochs * (train_examples * (b.pgd_steps + 1) + val_examples * (b.val_pgd_steps + 1))
    passes = per_run * sum(sizes.values())
    aa_examples = 0 if bench.autoattack_examples == 0 else min(n_test, b.max_test_examples or n_test, bench.autoattack_examples or n_test)
    train_s = passes * SECONDS_PER_EXAMPLE_PASS / bench.jobs
    aa_s = 2 * sizes["final"] * aa_examples * AUTOATTACK_SECONDS_PER_EXAMPLE / bench.jobs
    aa = f"{2 * sizes['final']} evaluations (last and best) on {aa_examples} test examples" if aa_examples else "off"

    def duration(seconds: float) -> str:
        return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"

    return (
        f"Plan: {sizes['tune']} tuning runs (validation), then {sizes['final']} final runs (test) and {sizes['gamma']} gamma-study runs; "
        f"{sum(sizes.values())} runs in all, {bench.jobs} at a time. AutoAttack: {aa}. Rough estimate for the small CNN on digits "
        f"(other models are slower): training {passes / 1e6:.1f}M example passes ~ {duration(train_s)}, AutoAttack at most ~ {duration(aa_s)} "
        f"(a best checkpoint that is the last one is attacked once)."
    )


def _specs(phase: str, configs: Sequence[TrainConfig], aa: Optional[int], num_classes: int) -> List[RunSpec]:
    return [RunSpec(phase, config, aa, num_classes) for config in configs]


def run_benchmark(bench: BenchConfig, console: Optional[Console] = None) -> Dict[str, Any]:
    """Validate, run the three phases (reusing finished runs), report; return the report's dict plus the rows of each phase."""
    bench.validate()
    require("matplotlib", "The benchmark's plots")  # missing extras fail here, before any run
    if bench.autoattack_examples != 0:
        require("pyautoattack", "The benchmark's AutoAttack evaluation")
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=240)  # wide tables stay readable in logs and pipes
    splits = load_dataset(bench.base.dataset, bench.base.data_dir, split_seed=0)  # missing CIFAR files fail here
    console.print(budget_text(bench))
    console.print(estimate_text(bench, plan_sizes(bench), len(splits.train), len(splits.val), len(splits.test)))  # type: ignore[arg-type]
    runs_dir = str(Path(bench.out_dir) / "runs")
    started = time.perf_counter()
    tuning = run_many(_specs("tune", tuning_configs(bench), 0, splits.num_classes), runs_dir, bench.jobs, console, "phase 1: tuning")
    selected = select_lrs(tuning)
    for (eps, method, optimizer), lr in selected.items():
        console.print(f"selected (validation): eps {eps:g} {method} {optimizer}: " + (f"lr {lr:g}" if lr is not None else "every lr collapsed, no final runs"))
    final = _specs("final", final_configs(bench, selected), bench.autoattack_examples, splits.num_classes)
    gamma = _specs("gamma", gamma_configs(bench, selected), 0, splits.num_classes)
    rows = run_many(final + gamma, runs_dir, bench.jobs, console, "phases 2+3: seeds on test")
    result = report(bench, tuning, rows[: len(final)], rows[len(final):], selected, time.perf_counter() - started, console)
    return {**result, "tuning": tuning, "final": rows[: len(final)], "gamma": rows[len(final):], "selected": selected}


def quick_config(out_dir: Optional[str] = None, **overrides: Any) -> BenchConfig:
    """The ``--quick`` smoke-test budget (a few minutes on 2 CPU cores): 2-point grids, 2 seeds, 2 epochs, subsets, AutoAttack on 8 examples."""
    base = replace(_default_base(), epochs=2, max_train_examples=256, max_val_examples=64, max_test_examples=100, pgd_steps=5, val_pgd_steps=5, device="cpu")
    bench = BenchConfig(
        lr_grid_msgd=(0.05, 0.1), lr_grid_engm=(0.5, 1.0), seeds=(0, 1), autoattack_examples=8, jobs=min(2, os.cpu_count() or 1),
        out_dir=out_dir or "benchmarks/results/engm_vs_msgd-quick", base=base, quick=True,
    )
    return replace(bench, **overrides)


__all__ = [
    "BenchConfig", "DEFAULT_METHODS", "OPTIMIZER_CHOICES", "STEP_FRACTION", "final_configs", "gamma_configs", "lr_grid",
    "plan_sizes", "quick_config", "run_benchmark", "run_name", "tuning_configs",
]
