"""``engm-opacus eval CHECKPOINT``: clean, PGD and AutoAttack accuracy of a trained model on the test split.

The model, dataset and threat model (eps, PGD step) come from the checkpoint's config;
options override them. AutoAttack is torchattacks' ``AutoAttack`` (version "standard":
APGD-CE, APGD-T, FAB-T, Square); the original ``auto-attack`` package is not on PyPI.
:func:`engm_opacus.training.evaluation.evaluate_checkpoint` does the work. The results are
printed as a table and written as JSON (default: next to the
checkpoint, ``<name>.eval.json``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from engm_opacus.cli import number
from engm_opacus.training.config import format_eps
from engm_opacus.training.evaluation import evaluate_checkpoint
from engm_opacus.training.logs import write_json
from engm_opacus.training.runtime import DEVICES


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``eval`` subparser."""
    parser = subparsers.add_parser(
        "eval",
        help="clean, PGD-20 and AutoAttack accuracy of a checkpoint on the test split",
        description=(
            "Clean, PGD and AutoAttack accuracy of a checkpoint on its dataset's test split. Model, dataset and "
            "threat model come from the checkpoint; options override them. AutoAttack is torchattacks' "
            "(version 'standard'); the original auto-attack package is not on PyPI."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="best.pt or last.pt written by engm-opacus train")
    parser.add_argument("--no-autoattack", dest="autoattack", action="store_false", help="skip AutoAttack (slow)")
    parser.add_argument("--max-examples", type=int, default=None, help="evaluate the first N test examples only")
    parser.add_argument("--pgd-steps", type=int, default=20, help="PGD steps")
    parser.add_argument("--eps", type=number, default=None, help="L-infinity radius (default: the checkpoint's)")
    parser.add_argument("--step-size", type=number, default=None, help="PGD step (default: the checkpoint's)")
    parser.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="device")
    parser.add_argument("--data-dir", default=None, help="CIFAR folder (default: the checkpoint's)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (the small default model is fastest on 1)")
    parser.add_argument("--output", default=None, help="JSON file (default: CHECKPOINT with suffix .eval.json)")
    parser.set_defaults(handler=run_eval)
    return parser


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate, print the table, write the JSON."""
    results = evaluate_checkpoint(
        args.checkpoint, autoattack=args.autoattack, max_examples=args.max_examples, pgd_steps=args.pgd_steps,
        eps=args.eps, step_size=args.step_size, batch_size=args.batch_size, device=args.device, data_dir=args.data_dir,
        threads=args.threads,
    )
    output = Path(args.output) if args.output else Path(args.checkpoint).with_suffix(".eval.json")
    write_json(results, output)
    table = Table(title=f"{results['checkpoint']} (epoch {results['epoch']}) on {results['dataset']} test, {results['examples']} examples, eps {format_eps(results['eps'])}")
    table.add_column("clean acc", justify="right")
    table.add_column(f"PGD-{results['pgd_steps']} acc", justify="right")
    table.add_column("AutoAttack acc", justify="right")
    aa = results["autoattack_acc"]
    table.add_row(f"{results['clean_acc']:.2%}", f"{results['pgd_acc']:.2%}", "skipped" if aa is None else f"{aa:.2%}")
    console = Console()
    console.print(table)
    console.print(f"Wrote {output}")
    return 0
