"""``engm-opacus eval CHECKPOINT``: clean, PGD and AutoAttack accuracy of a trained model on the test split.

The model, dataset and threat model (eps, PGD step) come from the checkpoint's config;
options override them. AutoAttack is the original implementation (the ``pyautoattack``
package, the ``[eval]`` extra), version "standard" by default (APGD-CE, APGD-T, FAB-T, Square;
100 iterations); ``--autoattack-version`` picks "plus", "rand" or "custom" (with ``--attacks``).
:func:`engm_opacus.training.evaluation.evaluate_checkpoint` does the work. The results are
printed as a table first, then merged into the JSON file (default: next to the checkpoint,
``<name>.eval.json``): a run without AutoAttack keeps an earlier AutoAttack number of the
same checkpoint, with its settings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict

from rich.console import Console
from rich.table import Table

from engm_opacus.cli import number
from engm_opacus.training.config import format_eps
from engm_opacus.training.evaluation import AUTOATTACK_ATTACKS, AUTOATTACK_VERSIONS, evaluate_checkpoint
from engm_opacus.training.extras import MissingExtraError
from engm_opacus.training.logs import merge_eval_results
from engm_opacus.training.runtime import DEVICES


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``eval`` subparser."""
    parser = subparsers.add_parser(
        "eval",
        help="clean, PGD-20 and AutoAttack accuracy of a checkpoint on the test split",
        description=(
            "Clean, PGD and AutoAttack accuracy of a checkpoint on its dataset's test split. Model, dataset and "
            "threat model come from the checkpoint; options override them. AutoAttack is the original "
            "implementation (pip install 'engm-opacus[eval]'), version 'standard' unless --autoattack-version says "
            "otherwise. The table is printed, then merged into the JSON file: a run with --no-autoattack keeps an "
            "earlier AutoAttack number of the same checkpoint."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="best.pt or last.pt written by engm-opacus train")
    parser.add_argument("--no-autoattack", dest="autoattack", action="store_false", help="skip AutoAttack (slow)")
    parser.add_argument(
        "--autoattack-version", choices=AUTOATTACK_VERSIONS, default="standard",
        help="AutoAttack version: standard (APGD-CE, APGD-T, FAB-T, Square), plus, rand (randomized defenses), "
        "or custom (the --attacks given)",
    )
    parser.add_argument(
        "--attacks", nargs="+", choices=AUTOATTACK_ATTACKS, default=None, metavar="ATTACK",
        help=f"the attacks of --autoattack-version custom, from: {', '.join(AUTOATTACK_ATTACKS)}",
    )
    parser.add_argument("--max-examples", type=int, default=None, help="evaluate the first N test examples only")
    parser.add_argument("--pgd-steps", type=int, default=20, help="PGD steps")
    parser.add_argument("--eps", type=number, default=None, help="L-infinity radius (default: the checkpoint's)")
    parser.add_argument("--step-size", type=number, default=None, help="PGD step (default: the checkpoint's)")
    parser.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="device")
    parser.add_argument("--data-dir", default=None, help="CIFAR folder (default: the checkpoint's)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (the small default model is fastest on 1)")
    parser.add_argument("--seed", type=int, default=0, help="seeds PGD's random start and AutoAttack")
    parser.add_argument("--output", default=None, help="JSON file (default: CHECKPOINT with suffix .eval.json)")
    parser.set_defaults(handler=run_eval)
    return parser


def results_table(results: Dict[str, Any]) -> Table:
    """The one-row table of an evaluation (AutoAttack's version in its column header)."""
    table = Table(
        title=f"{results['checkpoint']} (epoch {results['epoch']}) on {results['dataset']} test, "
        f"{results['examples']} examples, eps {format_eps(results['eps'])}"
    )
    table.add_column("clean acc", justify="right")
    table.add_column(f"PGD-{results['pgd_steps']} acc", justify="right")
    version = results.get("autoattack_version")
    table.add_column(f"AutoAttack ({version}) acc" if version else "AutoAttack acc", justify="right")
    aa = results["autoattack_acc"]
    table.add_row(f"{results['clean_acc']:.2%}", f"{results['pgd_acc']:.2%}", "skipped" if aa is None else f"{aa:.2%}")
    return table


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate, print the table, then merge the results into the JSON file."""
    if args.attacks and args.autoattack_version != "custom":
        raise ValueError("--attacks chooses the attacks of --autoattack-version custom. Fix: add --autoattack-version custom.")
    try:
        results = evaluate_checkpoint(
            args.checkpoint, autoattack=args.autoattack, max_examples=args.max_examples, pgd_steps=args.pgd_steps,
            eps=args.eps, step_size=args.step_size, batch_size=args.batch_size, device=args.device, data_dir=args.data_dir,
            threads=args.threads, autoattack_version=args.autoattack_version, autoattack_attacks=args.attacks, seed=args.seed,
        )
    except MissingExtraError as error:
        print(f"engm-opacus eval: error: {error} Or skip AutoAttack: --no-autoattack.", file=sys.stderr)
        return 2
    console = Console()
    console.print(results_table(results))  # before any write: a failed write cannot lose the numbers
    output = Path(args.output) if args.output else Path(args.checkpoint).with_suffix(".eval.json")
    merged = merge_eval_results(output, results)
    if results["autoattack_acc"] is None and merged.get("autoattack_acc") is not None:
        earlier = merged.get("measured_with", {}).get("autoattack_acc", {})
        console.print(
            f"Kept the earlier AutoAttack accuracy {merged['autoattack_acc']:.2%} "
            f"(version {merged.get('autoattack_version', '?')}, {earlier.get('examples', '?')} examples) in {output}"
        )
    console.print(f"Wrote {output}")
    return 0
