"""Does ENGM help? ENGM vs MSGD across AT methods, seeds and hyper-parameters (a benchmark).

The same as ``engm-opacus bench`` (options: ``--help``); the logic lives in
:mod:`engm_opacus.experiments.benchmark`. Usage::

    python benchmarks/engm_vs_msgd.py --quick            # 2 CPU cores, < 15 min
    python benchmarks/engm_vs_msgd.py                    # full digits budget (GPU)
    python benchmarks/engm_vs_msgd.py --dataset cifar10 --data-dir DATA   # PreAct ResNet-18 (GPU)
"""

from __future__ import annotations

import argparse
import sys

from engm_opacus.cli.bench import add_arguments, run

if __name__ == "__main__":
    parser = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    sys.exit(run(parser.parse_args()))
