"""``engm-opacus eval CHECKPOINT``: clean, PGD and AutoAttack accuracy of a trained model on the test split.

The model, dataset and threat model (eps, PGD step) come from the checkpoint's config;
options override them. AutoAttack is torchattacks' ``AutoAttack`` (version "standard":
APGD-CE, APGD-T, FAB-T, Square); the original ``auto-attack`` package is not on PyPI.
The results are printed as a table and written as JSON (default: next to the
checkpoint, ``<name>.eval.json``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, Optional

from rich.console import Console
from rich.table import Table

from engm_opacus.checkpoints import atomic_write_text
from engm_opacus.commands.train import number
from engm_opacus.data import limit, load_dataset, make_loader
from engm_opacus.evaluation import evaluate
from engm_opacus.training import DEVICES, format_eps, load_trained_model, resolve_device, torch_threads


def evaluate_checkpoint(
    checkpoint: str,
    *,
    autoattack: bool = True,
    max_examples: Optional[int] = None,
    pgd_steps: int = 20,
    eps: Optional[float] = None,
    step_size: Optional[float] = None,
    batch_size: int = 256,
    device: str = "auto",
    data_dir: Optional[str] = None,
    threads: Optional[int] = 1,
) -> Dict[str, Any]:
    """Evaluate a checkpoint on its dataset's test split (``threads``: torch CPU threads meanwhile, ``None`` = unchanged).

    Returns:
        ``{"checkpoint", "epoch", "dataset", "model", "optimizer", "at_method", "examples", "eps",
        "step_size", "pgd_steps", "clean_acc", "pgd_acc", "autoattack_acc"}`` (``autoattack_acc``
        is ``None`` when ``autoattack`` is off).

    Raises:
        CheckpointError: unreadable or foreign checkpoint.
        FileNotFoundError: the dataset's files are absent.
        ValueError: eps / step size outside [0, 1], bad ``max_examples``.
    """
    torch_device = resolve_device(device)
    model, config, payload = load_trained_model(checkpoint, torch_device)
    eps = config.eps if eps is None else eps
    step_size = config.step_size if step_size is None else step_size
    splits = load_dataset(config.dataset, config.data_dir if data_dir is None else data_dir)
    test = limit(splits.test, max_examples)
    with torch_threads(threads):
        metrics = evaluate(
            model, make_loader(test, batch_size, shuffle=False), eps=eps, pgd_steps=pgd_steps, step_size=step_size,
            autoattack=autoattack, device=torch_device,
        )
    return {
        "checkpoint": str(checkpoint),
        "epoch": payload["epoch"],
        "dataset": config.dataset,
        "model": config.model,
        "optimizer": config.optimizer,
        "at_method": config.at_method,
        "examples": len(test),
        "eps": eps,
        "step_size": step_size,
        "pgd_steps": pgd_steps,
        "clean_acc": metrics["clean_acc"],
        "pgd_acc": metrics["pgd_acc"],
        "autoattack_acc": metrics.get("autoattack_acc"),
    }


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
    atomic_write_text(json.dumps(results, indent=2) + "\n", output)
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
