"""The ``engm-opacus`` command line (``python -m engm_opacus`` is the same): ``main`` and the subcommand registry.

Each subcommand is one module of this package listed in :data:`COMMANDS`.
A command module provides:

* ``register(subparsers) -> argparse.ArgumentParser``: add its subparser (with ``help``)
  and its options, and ``set_defaults(handler=run)``;
* ``run(args: argparse.Namespace) -> int``: do the work and return the exit status.

Adding a subcommand is one new module and one line in :data:`COMMANDS`. Bad input
(``ValueError`` -- including :class:`~engm_opacus.training.checkpoints.CheckpointError` --,
``FileNotFoundError``, ``FileExistsError``) raised by a handler is printed as
``engm-opacus COMMAND: error: ...`` and exits with status 2, like argparse's own usage errors.
A failed write (:class:`~engm_opacus.training.logs.OutputError`, or an ``OSError`` with errno
ENOSPC / EACCES / EROFS / EDQUOT / EPERM) is one line naming the path and the errno, status 1.
Ctrl-C is one line (the training loop's names the last checkpoint and the resume command),
status 130 (128 + SIGINT).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
from fractions import Fraction
from typing import List, Optional

from engm_opacus.training.extras import MissingExtraError
from engm_opacus.training.logs import OutputError

COMMANDS: List[str] = [
    "engm_opacus.cli.train",
    "engm_opacus.cli.eval",
    "engm_opacus.cli.bench",
    "engm_opacus.cli.diagnose",
]
"""Modules of the subcommands, in the order ``--help`` lists them."""

BAD_INPUT = (ValueError, FileNotFoundError, FileExistsError, MissingExtraError)
WRITE_ERRNOS = frozenset(getattr(errno, name) for name in ("ENOSPC", "EACCES", "EROFS", "EDQUOT", "EPERM") if hasattr(errno, name))
"""errno values reported as one line (status 1) when an ``OSError`` with them reaches :func:`main`."""
EXIT_WRITE_ERROR = 1
EXIT_INTERRUPTED = 130


def number(text: str) -> float:
    """A float written as a decimal or a fraction (``8/255``): the type of every numeric option."""
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number such as 0.03 or 8/255, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every module of :data:`COMMANDS` registered."""
    parser = argparse.ArgumentParser(
        prog="engm-opacus",
        description="ENGM (example-normalized gradient descent with momentum) for adversarial training, on Opacus.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMANDS:
        importlib.import_module(module_name).register(subparsers)
    return parser


def write_error_line(error: OSError) -> str:
    """One line for a failed write: the path, the reason and the errno's name."""
    if isinstance(error, OutputError):
        return str(error)
    name = errno.errorcode.get(error.errno, "?") if error.errno is not None else "?"
    return f"cannot write {error.filename}: {error.strerror} ({name}, errno {error.errno})"


def main(argv: Optional[List[str]] = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the subcommand, return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    prefix = f"engm-opacus {args.command}"
    try:
        return int(args.handler(args) or 0)
    except OutputError as error:
        print(f"{prefix}: error: {write_error_line(error)}", file=sys.stderr)
        return EXIT_WRITE_ERROR
    except BAD_INPUT as error:
        print(f"{prefix}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno not in WRITE_ERRNOS:
            raise
        print(f"{prefix}: error: {write_error_line(error)}", file=sys.stderr)
        return EXIT_WRITE_ERROR
    except KeyboardInterrupt as error:
        print(f"{prefix}: interrupted{': ' + str(error) if str(error) else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
