"""``engm-opacus bench``: does ENGM help? ENGM vs MSGD with lr tuned on validation, then seeds on test.

Runs :func:`engm_opacus.experiments.benchmark.run_benchmark` (``benchmarks/engm_vs_msgd.py`` is
the same command): per eps, AT method and optimizer a 5-point lr grid trained once on the tuning seed and
scored on validation, then the selected lr with 5 seeds on the test split (clean, PGD-20, AutoAttack
of the last and best checkpoint), and an ENGM gamma study. Default: the full protocol on digits at eps 0.2
(20 epochs; about 1.5 hours on 2 CPU cores); ``--quick`` is a smoke test of a few minutes. Re-running with the same
options reuses finished runs and resumes interrupted ones.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any, Dict

from engm_opacus.at.losses import at_method_names
from engm_opacus.experiments.benchmark import DEFAULT_METHODS, OPTIMIZER_CHOICES, BenchConfig, quick_config, run_benchmark
from engm_opacus.cli import number
from engm_opacus.training.data import DATASETS
from engm_opacus.training.options import plain_text
from engm_opacus.training.runtime import DEVICES


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the benchmark's options to ``parser`` (shared by the subcommand and the script)."""
    parser.add_argument("--quick", action="store_true", help="smoke-test budget (a few minutes on 2 CPU cores): 2-point grids, 2 seeds, 2 epochs, subsets")
    parser.add_argument("--eps", nargs="+", type=float, help="L-infinity radii, each a full protocol; step eps/4 (default: 0.2)")
    parser.add_argument("--methods", nargs="+", choices=at_method_names(), help=f"AT methods (default: {' '.join(DEFAULT_METHODS)})")
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZER_CHOICES, help=f"optimizers (default: {' '.join(OPTIMIZER_CHOICES)})")
    parser.add_argument("--lr-grid-msgd", nargs="+", type=float, help="MSGD's tuning grid (default: 0.01 0.02 0.05 0.1 0.2; quick: 0.05 0.1)")
    parser.add_argument("--lr-grid-engm", nargs="+", type=float, help="the ENGM variants' tuning grid (default: 0.1 0.2 0.5 1 2; quick: 0.5 1)")
    parser.add_argument("--tuning-seed", type=int, help="seed of the tuning runs, not a final seed (default: 1000)")
    parser.add_argument("--seeds", nargs="+", type=int, help="final seeds (default: 0 1 2 3 4; quick: 0 1)")
    parser.add_argument("--gamma-study", nargs="*", type=number, help="ENGM gammas besides --gamma for PGD-AT (default: 0.25 4; none: no study)")
    parser.add_argument("--gamma", type=float, help="base ENGM gamma of the tuning and final runs (default: 1)")
    parser.add_argument("--autoattack-examples", type=int, help="test examples for AutoAttack, 0 = off, 360 or more = the whole digits test split (default: 100; quick: 8)")
    parser.add_argument("--epochs", type=int, help="training epochs (default: 20; quick: 2)")
    parser.add_argument("--batch-size", type=int, help="mini-batch size (default: 64)")
    parser.add_argument("--max-train-examples", type=int, help="train on the first N training examples (default: all; quick: 256)")
    parser.add_argument("--max-val-examples", type=int, help="validate on the first N examples (default: all; quick: 64)")
    parser.add_argument("--max-test-examples", type=int, help="test on the first N examples (default: all; quick: 100)")
    parser.add_argument("--pgd-steps", type=int, help="PGD steps of the training attack (default: 10; quick: 5)")
    parser.add_argument("--dataset", choices=DATASETS, help="dataset (default: digits)")
    parser.add_argument("--data-dir", help="folder with the CIFAR files")
    parser.add_argument("--model", help="architecture (default: small-cnn; preact-resnet18 with --dataset cifar10)")
    parser.add_argument("--device", choices=DEVICES, help="device (default: auto; quick: cpu)")
    parser.add_argument("--jobs", type=int, help="runs in parallel, 1 torch thread each (default: 2)")
    parser.add_argument("--out-dir", help="results folder (default: benchmarks/results/engm_vs_msgd[-quick])")
    return parser


BENCH_FIELDS = (
    "eps", "methods", "optimizers", "lr_grid_msgd", "lr_grid_engm", "tuning_seed", "seeds", "gamma_study", "autoattack_examples", "jobs", "out_dir",
)
TRAIN_FIELDS = ("gamma", "epochs", "batch_size", "max_train_examples", "max_val_examples", "max_test_examples", "pgd_steps", "dataset", "data_dir", "model", "device")


def bench_config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The quick or full :class:`BenchConfig` with the given options applied."""
    given: Dict[str, Any] = {k: v for k, v in vars(args).items() if v is not None}
    bench = quick_config() if args.quick else BenchConfig()
    train_overrides = {k: given[k] for k in TRAIN_FIELDS if k in given}
    if given.get("dataset", "digits") != "digits" and "model" not in given:
        train_overrides["model"] = "preact-resnet18"
    base = replace(bench.base, **train_overrides)
    return replace(bench, base=base, **{k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if k in BENCH_FIELDS})


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``bench`` subparser."""
    parser = subparsers.add_parser(
        "bench", help="benchmark ENGM vs MSGD (lr tuned on validation, then seeds on test, AutoAttack, gamma study)",
        description=plain_text(__doc__.split("\n\n")[1]),
    )
    add_arguments(parser)
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; tables are printed and files written by :func:`~engm_opacus.experiments.benchmark.run_benchmark`."""
    try:
        run_benchmark(bench_config_from_args(args))
    except KeyboardInterrupt as error:
        raise KeyboardInterrupt("finished runs are kept; the same command again reuses them and resumes the rest") from error
    return 0
