"""``engm-opacus diagnose``: per-example gradient statistics of natural training vs PGD-AT on digits.

Trains the same small CNN with MSGD twice (clean loss, PGD-AT loss) and measures, before
training and after every epoch, the mean per-example gradient norm, the gradient variance
(trace of the per-example covariance, and of the mini-batch mean), the Pearson and Spearman
correlation of parameter- and input-gradient norms, and the ENGM weights (the formulas
are in the engm_opacus.experiments.diagnostics module). Writes CSV files and PNG plots to ``--out`` and prints
the AT/NT ratios as a table.
"""

from __future__ import annotations

import argparse

from rich.console import Console

from engm_opacus.cli import number
from engm_opacus.experiments.diagnostics import DiagnosticsConfig, run_diagnostics
from engm_opacus.experiments.diagnostics_report import ratios_table
from engm_opacus.training.options import plain_text

DEFAULTS = DiagnosticsConfig()


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``diagnose`` subparser."""
    parser = subparsers.add_parser(
        "diagnose",
        help="gradient norm, variance and norm correlations: natural training vs PGD-AT",
        description=plain_text(__doc__.split("\n\n")[1]),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="folder for the CSV files and PNG plots (created)")
    parser.add_argument("--epochs", type=int, default=DEFAULTS.epochs, help="training epochs per regime")
    parser.add_argument("--gamma", type=number, default=DEFAULTS.gamma, help="ENGM floor for the weight distribution")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="training batch size B")
    parser.add_argument("--lr", type=number, default=DEFAULTS.lr, help="MSGD learning rate")
    parser.add_argument("--eps", type=number, default=DEFAULTS.eps, help="PGD L-infinity radius (e.g. 8/255)")
    parser.add_argument("--step-size", type=number, default=DEFAULTS.step_size, help="PGD step")
    parser.add_argument("--pgd-steps", type=int, default=DEFAULTS.pgd_steps, help="PGD steps")
    parser.add_argument("--probe-size", type=int, default=DEFAULTS.probe_size, help="training examples measured")
    parser.add_argument(
        "--max-train-examples", type=int, default=None, help="use the first N training examples (default: all)"
    )
    parser.add_argument("--width", type=int, default=DEFAULTS.width, help="small-CNN base width")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="initialization, batch order, PGD start")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run :func:`~engm_opacus.experiments.diagnostics.run_diagnostics`, print the ratio table and the files written."""
    config = DiagnosticsConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        eps=args.eps,
        step_size=args.step_size,
        pgd_steps=args.pgd_steps,
        gamma=args.gamma,
        probe_size=args.probe_size,
        max_train_examples=args.max_train_examples,
        width=args.width,
        seed=args.seed,
    )
    result = run_diagnostics(args.out, config)
    console = Console()
    console.print(ratios_table(result))
    for path in result.files:
        console.print(f"Wrote {path}")
    return 0
