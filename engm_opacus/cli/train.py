"""``engm-opacus train``: adversarial training from the command line (see :func:`engm_opacus.training.loop.train`).

With no options it trains the default :class:`~engm_opacus.training.config.TrainConfig` (small
CNN, PGD-AT, ENGM on the embedded digits set). Options override single fields; with
``--resume CHECKPOINT`` the checkpoint's config is the base and only the options given
override it (so ``engm-opacus train --resume runs/X/last.pt`` continues run X as it was).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any, Callable, Dict

from engm_opacus.at.losses import at_method_names
from engm_opacus.cli import number
from engm_opacus.training.checkpoints import load_checkpoint
from engm_opacus.training.config import OPTIMIZERS, SCHEDULES, TrainConfig, config_from_payload
from engm_opacus.training.data import DATASETS
from engm_opacus.training.loop import train
from engm_opacus.training.models import MODELS, NORMS
from engm_opacus.training.runtime import DEVICES

DEFAULTS = TrainConfig()


def _add(parser: argparse.ArgumentParser, flag: str, help_text: str, type_: Callable[[str], Any] | None = None, **kwargs: Any) -> None:
    """Add ``flag`` with ``default=SUPPRESS`` (only given options override), its default shown in the help."""
    dest = flag.lstrip("-").replace("-", "_")
    shown = getattr(DEFAULTS, dest, None)
    if isinstance(shown, float):
        shown = f"{shown:.6g}"
    if kwargs.get("action") in ("store_true",):
        parser.add_argument(flag, help=help_text, default=argparse.SUPPRESS, **kwargs)
    else:
        parser.add_argument(flag, type=type_, help=f"{help_text} (default: {shown})", default=argparse.SUPPRESS, **kwargs)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``train`` subparser."""
    parser = subparsers.add_parser(
        "train",
        help="adversarially train a model with ENGM or MSGD",
        description=(
            "Adversarially train a model. Without options: small CNN, PGD-AT (eps 8/255), ENGM, on the embedded "
            "digits set. Options override single settings; with --resume CHECKPOINT the checkpoint's settings are "
            "the base and only the options given override them."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data and model")
    _add(data, "--dataset", "dataset", str, choices=DATASETS)
    _add(data, "--data-dir", "folder with the CIFAR files (cifar-10-batches-py/ or cifar-100-python/)", str)
    _add(data, "--model", "architecture", str, choices=tuple(MODELS))
    _add(data, "--norm", "normalization layers", str, choices=NORMS)
    _add(data, "--width", "model width / widen factor override (None: the standard one)", int)
    _add(data, "--max-train-examples", "train on the first N training examples only", int)
    _add(data, "--max-val-examples", "validate on the first N validation examples only", int)
    _add(data, "--max-test-examples", "test on the first N test examples only", int)
    attack = parser.add_argument_group("adversarial training")
    _add(attack, "--at-method", "AT loss", str, choices=at_method_names())
    _add(attack, "--eps", "L-infinity radius in [0, 1]; fractions such as 8/255 are accepted", number)
    _add(attack, "--step-size", "PGD step in [0, 1]", number)
    _add(attack, "--pgd-steps", "PGD steps of the training attack", int)
    _add(attack, "--val-pgd-steps", "PGD steps of the per-epoch validation attack", int)
    _add(attack, "--test-pgd-steps", "PGD steps of the final test evaluation", int)
    _add(attack, "--attack-eval-mode", "attack with the model in eval mode during training", action="store_true")
    optim = parser.add_argument_group("optimizer")
    _add(
        optim, "--optimizer",
        "outer optimizer: engm (exact per-example norms), engm-input-norm (norms estimated from input gradients), "
        "or msgd for the plain momentum-SGD baseline", str, choices=OPTIMIZERS,
    )
    _add(optim, "--gamma", "ENGM normalization floor in w_i = 1/max(||g_i||, gamma)", number)
    _add(optim, "--lr", "base learning rate", number)
    _add(optim, "--momentum", "SGD momentum", number)
    _add(optim, "--weight-decay", "SGD weight decay", number)
    _add(optim, "--nesterov", "Nesterov momentum", action="store_true")
    _add(optim, "--schedule", "LR schedule (piecewise: /10 at 50%% and 75%% of the epochs)", str, choices=SCHEDULES)
    _add(optim, "--epochs", "training epochs", int)
    _add(optim, "--batch-size", "mini-batch size", int)
    run = parser.add_argument_group("run")
    _add(run, "--seed", "seed of initialization, data order and attacks", int)
    _add(run, "--device", "device", str, choices=DEVICES)
    _add(run, "--threads", "CPU threads for torch (the small default model is fastest on 1)", int)
    _add(run, "--out-dir", "run folder (None: runs/<UTC time>-<dataset>-<optimizer>-<at-method>)", str)
    _add(run, "--resume", "continue the run of this checkpoint (its config is the base)", str)
    _add(run, "--overwrite", "allow a fresh run in an --out-dir that already has checkpoints", action="store_true")
    run.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS, help="no progress bars or tables")
    parser.set_defaults(handler=run_train)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """``TrainConfig()`` (or the ``--resume`` checkpoint's config) with the given options applied."""
    given: Dict[str, Any] = {k: v for k, v in vars(args).items() if k in asdict(DEFAULTS)}
    base = config_from_payload(load_checkpoint(given["resume"])) if "resume" in given else TrainConfig()
    return TrainConfig(**{**asdict(base), **given})


def run_train(args: argparse.Namespace) -> int:
    """Train; the final accuracies are printed by :func:`engm_opacus.training.loop.train`."""
    train(config_from_args(args))
    return 0
