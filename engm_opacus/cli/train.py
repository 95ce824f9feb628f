"""``engm-opacus train``: adversarial training from the command line (see :func:`engm_opacus.training.loop.train`).

With no options it trains the default :class:`~engm_opacus.training.config.TrainConfig` (small
CNN, PGD-AT, ENGM on the embedded digits set). Every field of ``TrainConfig`` is a flag and a
``--config`` file key (:mod:`engm_opacus.cli.config_args`); with ``--resume CHECKPOINT`` the
checkpoint's config is the base and only the options given override it (so ``engm-opacus train
--resume runs/X/last.pt`` continues run X as it was). The result tables are printed even with
``--no-progress``; Ctrl-C ends with one line naming the last checkpoint and the resume command
(exit status 130). Started by ``torchrun --nproc_per_node N -m engm_opacus train ...`` it trains
data-parallel with the same options (``--batch-size`` is the global batch; rank 0 writes and
prints): :mod:`engm_opacus.training.distributed`.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from engm_opacus.cli.config_args import add_config_arguments, config_from_args, config_to_json
from engm_opacus.training.loop import train

DESCRIPTION = (
    "Adversarially train a model. Without options: small CNN, PGD-AT (eps 8/255), ENGM, on the embedded digits set. "
    "Every TrainConfig field is a flag below and a key of a --config file (JSON or TOML); flags override the file. "
    "With --resume CHECKPOINT the checkpoint's settings are the base and only the options given override them. "
    "Options in brackets apply to the AT methods / optimizers listed. "
    "Under torchrun --nproc_per_node N -m engm_opacus train: data-parallel, --batch-size is the global batch."
)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``train`` subparser."""
    parser = subparsers.add_parser("train", help="adversarially train a model with ENGM or MSGD", description=DESCRIPTION)
    add_config_arguments(parser)
    parser.set_defaults(handler=run_train)
    return parser


def run_train(args: argparse.Namespace) -> int:
    """Train (or print the resolved config); the result tables are printed by :func:`~engm_opacus.training.loop.train`."""
    config = config_from_args(args)
    if args.print_config:
        replace(config).validate()  # report bad values now; print the config as given (lr None stays None)
        print(config_to_json(config))
        return 0
    train(config, print_results=True)
    return 0
