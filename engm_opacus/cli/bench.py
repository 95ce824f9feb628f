"""``engm-opacus bench``: does ENGM help? ENGM vs MSGD across AT methods, seeds and hyper-parameters.

Runs :func:`engm_opacus.experiments.benchmark.run_benchmark` (``benchmarks/engm_vs_msgd.py`` is
the same command). ``--quick`` uses :func:`engm_opacus.experiments.benchmark.quick_config` (2 CPU cores, < 15 min);
without it the full budget (all data, 30 epochs on digits, AutoAttack on up to 1000 test
examples; meant for a GPU). Re-running with the same options reuses finished runs and
resumes interrupted ones.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any, Dict

from engm_opacus.at.losses import at_method_names
from engm_opacus.experiments.benchmark import DEFAULT_METHODS, OPTIMIZER_CHOICES, BenchConfig, quick_config, run_benchmark
from engm_opacus.training.data import DATASETS
from engm_opacus.training.options import plain_text
from engm_opacus.training.runtime import DEVICES


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the benchmark's options to ``parser`` (shared by the subcommand and the script)."""
    parser.add_argument("--quick", action="store_true", help="the 2-CPU-core budget (< 15 min): subsets, few epochs, AutoAttack on a few examples")
    parser.add_argument("--methods", nargs="+", choices=at_method_names(), help=f"AT methods (default: {' '.join(DEFAULT_METHODS)})")
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZER_CHOICES, help=f"optimizers (default: {' '.join(OPTIMIZER_CHOICES)})")
    parser.add_argument("--seeds", nargs="+", type=int, help="training seeds (default: 0 1 2)")
    parser.add_argument("--sweep-seeds", type=int, help="use the first N seeds for the sensitivity and gamma sweeps (default: all; quick: 1)")
    parser.add_argument("--lr-multipliers", nargs="*", type=float, help="learning-rate factors of the sensitivity sweep (default: 0.5 1 2; none: no lr sweep)")
    parser.add_argument("--wd-multipliers", nargs="*", type=float, help="weight-decay factors of the sensitivity sweep (default: 0.1 1 10; none: no wd sweep)")
    parser.add_argument("--gamma-multipliers", nargs="*", type=float, help="gamma factors of the ENGM gamma sweep (default: 0.25 1 4; none: no sweep)")
    parser.add_argument("--lr-msgd", type=float, help="base lr of MSGD (default: DEFAULT_LR['msgd'] = 0.1)")
    parser.add_argument("--lr-engm", type=float, help="base lr of ENGM, exact and input-norm (default: DEFAULT_LR['engm'] = 0.5)")
    parser.add_argument("--gamma", type=float, help="ENGM gamma (default: 1)")
    parser.add_argument("--autoattack-examples", type=int, help="test examples for AutoAttack, 0 = off (default: 1000; quick: 16)")
    parser.add_argument("--autoattack-seeds", type=int, help="AutoAttack only for the first N seeds (default: all; quick: 1)")
    parser.add_argument("--epochs", type=int, help="training epochs (default: 30; quick: 4)")
    parser.add_argument("--batch-size", type=int, help="mini-batch size (default: TrainConfig().batch_size = 32; quick: 64)")
    parser.add_argument("--max-train-examples", type=int, help="train on the first N training examples (default: all; quick: 640)")
    parser.add_argument("--max-val-examples", type=int, help="validate on the first N examples (default: all; quick: 64)")
    parser.add_argument("--max-test-examples", type=int, help="test on the first N examples (default: all; quick: 200)")
    parser.add_argument("--pgd-steps", type=int, help="PGD steps of the training attack (default: 10; quick: 5)")
    parser.add_argument("--dataset", choices=DATASETS, help="dataset (default: digits)")
    parser.add_argument("--data-dir", help="folder with the CIFAR files")
    parser.add_argument("--model", help="architecture (default: small-cnn; preact-resnet18 with --dataset cifar10)")
    parser.add_argument("--device", choices=DEVICES, help="device (default: auto; quick: cpu)")
    parser.add_argument("--jobs", type=int, help="runs in parallel, 1 torch thread each (default: 1; quick: 2)")
    parser.add_argument("--out-dir", help="results folder (default: benchmarks/results/engm_vs_msgd[-quick])")
    return parser


BENCH_FIELDS = (
    "methods", "optimizers", "seeds", "sweep_seeds", "lr_multipliers", "wd_multipliers", "gamma_multipliers",
    "lr_msgd", "lr_engm", "autoattack_examples", "autoattack_seeds", "jobs", "out_dir",
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
    parser = subparsers.add_parser("bench", help="benchmark ENGM vs MSGD (AT methods x optimizers x seeds, sweeps)", description=plain_text(__doc__.split("\n\n")[1]))
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
