"""Step cost of the cheap ENGM variant vs MSGD-AT and exact ENGM (a benchmark, not a test).

One PGD-AT training step (attack included: ``engm_opacus.step.train_step``) for:

* MSGD-AT: plain ``torch.optim.SGD`` on the mean loss (the baseline, ratio 1.00);
* cheap ENGM, ``source="attack"``: the last PGD step's input gradient, no extra backward;
* cheap ENGM, ``source="recompute"``: one extra backward to the input;
* cheap ENGM calibration step: ``calibrate_every=1`` (exact norms by batched VJPs every step;
  with ``calibrate_every=K`` it is paid once per ``K`` steps);
* exact ENGM (Opacus hooks) on the GroupNorm version of the same ResNet, next to MSGD-AT on
  that GroupNorm version.

PreAct ResNet-18 of reduced width (BatchNorm unless stated), CIFAR-shaped random input
(``3x32x32``; speed does not depend on pixel values). The methods are timed round-robin,
one step each per round, so that load from other processes on a shared machine hits all of
them alike; each row is the median over ``--repeats`` rounds after one warm-up round, in
wall-clock time and in process CPU time (less disturbed by other processes). The FLOP
column counts one step's matmul/convolution operations (``torch.utils.flop_counter``):
a load-independent measure of the extra work.

Usage::

    python benchmarks/cheap_cost.py --threads 2 --width 8 --batch-size 64 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
from rich.console import Console
from rich.table import Table
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from engm_opacus import make_engm
from engm_opacus.losses.pgd_at import PGDAT
from engm_opacus.models import preact_resnet18
from engm_opacus.step import train_step

Step = Callable[[], None]


def setup(
    method: str, width: int, batch_size: int, pgd_steps: int, device: torch.device, seed: int
) -> Step:
    """A closure running one training step of ``method`` on a fixed random batch."""
    norm = "group" if method.endswith("(GroupNorm)") else "batch"
    torch.manual_seed(seed)
    model = preact_resnet18(num_classes=10, in_channels=3, norm=norm, width=width).to(device)
    sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(batch_size, 3, 32, 32, generator=generator).to(device)
    y = torch.randint(0, 10, (batch_size,), generator=generator).to(device)
    adapter = PGDAT(steps=pgd_steps, generator=torch.Generator(device=device).manual_seed(seed))
    if method.startswith("MSGD-AT"):
        optimizer: torch.optim.Optimizer = sgd
    elif method == "cheap ENGM, attack":
        model, optimizer = make_engm(model, sgd, gamma=1.0, variant="input-norm", input_norm_source="attack")
    elif method == "cheap ENGM, recompute":
        model, optimizer = make_engm(model, sgd, gamma=1.0, variant="input-norm", input_norm_source="recompute")
    elif method == "cheap ENGM, calibration step":
        model, optimizer = make_engm(model, sgd, gamma=1.0, variant="input-norm", calibrate_every=1)
    elif method == "exact ENGM hooks (GroupNorm)":
        model, optimizer = make_engm(model, sgd, gamma=1.0, grad_sample_mode="hooks")
    else:
        raise ValueError(f"unknown method {method!r}")

    def step() -> None:
        train_step(model, optimizer, adapter, x, y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


METHODS: Tuple[str, ...] = (
    "MSGD-AT",
    "cheap ENGM, attack",
    "cheap ENGM, recompute",
    "cheap ENGM, calibration step",
    "MSGD-AT (GroupNorm)",
    "exact ENGM hooks (GroupNorm)",
)


class FlopCount(TorchDispatchMode):
    """Sums ``torch.utils.flop_counter``'s per-op formulas (matmuls, convolutions) over every op run.

    ``FlopCounterMode`` itself is not used: its module tracker installs backward hooks that
    ``torch.autograd.grad`` w.r.t. a leaf input (every PGD step) refuses.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def count_flops(step: Step) -> float:
    """Floating-point operations of one step (``nan`` where an op cannot be traced, e.g. under vmap)."""
    counter = FlopCount()
    try:
        with counter:
            step()
    except RuntimeError:
        return float("nan")
    return float(counter.total)


def measure(steps: Dict[str, Step], repeats: int) -> Tuple[Dict[str, List[float]], Dict[str, List[float]]]:
    """Wall-clock and process-CPU seconds per step of every method.

    ``repeats`` round-robin rounds after one warm-up round (round 0). Process CPU time
    (all threads of this process) is less disturbed by other processes on a shared
    machine than wall-clock time, which also counts the time spent waiting for a core.
    """
    wall: Dict[str, List[float]] = {name: [] for name in steps}
    cpu: Dict[str, List[float]] = {name: [] for name in steps}
    for round_index in range(repeats + 1):
        for name, step in steps.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            if round_index > 0:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
        print(f"round {round_index}/{repeats} done", file=sys.stderr, flush=True)
    return wall, cpu


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--width", type=int, default=16, help="PreAct ResNet-18 base width (64 = standard)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--pgd-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (>= 5)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the raw times here")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be >= 5 (medians of at least 5 runs)")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    steps = {m: setup(m, args.width, args.batch_size, args.pgd_steps, device, args.seed) for m in METHODS}
    flops = {name: count_flops(step) for name, step in steps.items()}
    times, cpu_times = measure(steps, args.repeats)
    medians = {name: statistics.median(values) for name, values in times.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpu_times.items()}
    where = f"{args.device}, {torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    table = Table(
        title=(
            f"PGD-{args.pgd_steps} AT step, PreAct ResNet-18 width {args.width}, batch {args.batch_size}, "
            f"3x32x32, {where}; median of {args.repeats}"
        )
    )
    headers = (
        "method", "wall s/step (min-max)", "wall ratio", "min-wall ratio", "CPU s/step", "CPU ratio", "GFLOP", "FLOP ratio"
    )
    for header in headers:
        table.add_column(header, justify="right" if header != "method" else "left")
    for name in METHODS:
        base = "MSGD-AT (GroupNorm)" if name.endswith("(GroupNorm)") else "MSGD-AT"
        table.add_row(
            name,
            f"{medians[name]:.3f} ({min(times[name]):.2f}-{max(times[name]):.2f})",
            f"{medians[name] / medians[base]:.3f}x",
            f"{min(times[name]) / min(times[base]):.3f}x",
            f"{cpu_medians[name]:.3f}",
            f"{cpu_medians[name] / cpu_medians[base]:.3f}x",
            f"{flops[name] / 1e9:.2f}",
            f"{flops[name] / flops[base]:.3f}x",
        )
    Console().print(table)
    Console().print(
        "Ratios are to MSGD-AT on the same normalization (BatchNorm, or GroupNorm for the last two rows). "
        "Ratios of medians; 'min-wall ratio' compares the fastest (least disturbed) step of each method."
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}, "wall": times, "cpu": cpu_times, "flops": flops},
                indent=2,
            ))


if __name__ == "__main__":
    main()
