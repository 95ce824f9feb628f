"""Does ENGM help? ENGM vs MSGD with lr tuned on validation, then seeds on test (a benchmark).

The same as ``engm-opacus bench`` (options: ``--help``); the logic lives in
:mod:`engm_opacus.experiments.benchmark`. Usage::

    python benchmarks/engm_vs_msgd.py --quick      # smoke test, a few minutes on 2 CPU cores
    python benchmarks/engm_vs_msgd.py              # the full protocol: digits, eps 0.2, 135 runs (hours on 2 cores)
    python benchmarks/engm_vs_msgd.py --dataset cifar10 --data-dir DATA --device cuda   # PreAct ResNet-18
"""

from __future__ import annotations

import argparse
import sys

from engm_opacus.cli.bench import add_arguments, run

if __name__ == "__main__":
    parser = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    sys.exit(run(parser.parse_args()))
