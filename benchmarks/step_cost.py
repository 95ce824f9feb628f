"""Cost of one PGD-10 adversarial-training step: exact ENGM (hooks, functorch, ghost), cheap ENGM, Opacus, torch.func.

A benchmark, not a test. Every row is one full training step on a fixed random batch of
CIFAR shape (``3x32x32``; speed does not depend on pixel values): the PGD-10 attack
(L-inf, eps 8/255, step 2/255, random start) *and* the outer update. Rows:

* ``MSGD``: ``torch.optim.SGD`` on the mean loss (the baseline, ratio 1.00 per model/norm);
* ``ENGM hooks``: ``make_engm(grad_sample_mode="hooks")`` (per-example gradients materialized;
  on BatchNorm models the norm pass and the weighted pass of :mod:`engm_opacus.ghost`);
* ``ENGM functorch``: ``make_engm(grad_sample_mode="functorch")`` (GroupNorm only: functorch
  has no per-example rule for BatchNorm);
* ``ENGM ghost``: ``make_engm(grad_sample_mode="ghost")`` (ghost norms, two backward passes);
* ``cheap ENGM``: ``make_engm(variant="input-norm")`` with ``input_norm_source="attack"``
  (the last PGD step's input gradient);
* ``Opacus hooks`` / ``Opacus ghost``: Opacus's own ``GradSampleModule`` + ``DPOptimizer``
  and ``GradSampleModuleFastGradientClipping`` + ``DPOptimizerFastGradientClipping`` +
  ``DPLossFastGradientClipping``, ``noise_multiplier=0``, ``max_grad_norm=1``, built from the
  classes directly (``PrivacyEngine`` would add Poisson sampling and accounting, not step
  cost). Opacus refuses BatchNorm, so these rows (and every row they are compared with) run
  on the GroupNorm version of the same network (``norm="group"``: ``GroupNorm(gcd(32, C), C)``);
* ``torch.func``: ``vmap(grad)`` per-example gradients of a ``functional_call``, then the ENGM
  weighting by hand (GroupNorm only, like functorch).

Models: PreAct ResNet-18 (``--width``; 64 is the standard network) and the small CNN of
:mod:`engm_opacus.models` (3 input channels), each with BatchNorm and with GroupNorm.

Timing: the rows of one model/norm are run round-robin, one step each per round, so that
load from other processes hits all of them alike; the median over ``--repeats`` rounds
after one warm-up round is reported.

Peak memory per step: on CUDA, ``torch.cuda.max_memory_allocated`` during the step minus
the allocation before it; on CPU, a resource-based estimate: the process's peak resident
set (``VmHWM`` of ``/proc/self/status``, reset through ``/proc/self/clear_refs`` before the
step) minus the resident set before it, with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed so
that freed tensors return to the OS. That setting makes every large allocation a fresh
``mmap`` (page faults, zeroing), which would distort the times, so the CPU memory estimate
runs in a child process of its own (``--memory-json``) and the times in this one. Both are
added to the persistent bytes of the row (parameters, buffers, optimizer state). Ratios are
to MSGD on the same model and norm.

Usage::

    python benchmarks/step_cost.py --device cpu --threads 1 --width 4 --batch-size 128 --repeats 5
    python benchmarks/step_cost.py --device cuda --width 64 --batch-size 128 --repeats 7
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.func import functional_call, grad, vmap

from engm_opacus import make_engm
from engm_opacus.losses.pgd_at import PGDAT
from engm_opacus.models import preact_resnet18, small_cnn
from engm_opacus.step import train_step
from engm_opacus.weights import engm_weights

MMAP_THRESHOLD = "65536"
"""glibc ``MALLOC_MMAP_THRESHOLD_`` of the memory child: allocations above it are ``mmap``-ed, so freed tensors leave the RSS."""
Step = Callable[[], None]
GAMMA = 1.0
ROWS: Tuple[str, ...] = (
    "MSGD",
    "ENGM hooks",
    "ENGM functorch",
    "ENGM ghost",
    "cheap ENGM",
    "Opacus hooks",
    "Opacus ghost",
    "torch.func",
)
GROUP_NORM_ONLY = ("ENGM functorch", "Opacus hooks", "Opacus ghost", "torch.func")


def cheap_engm_available() -> bool:
    """Whether this engm_opacus has the cheap variant (``make_engm(variant="input-norm")``)."""
    try:
        import engm_opacus.cheap  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Setup:
    """One row: its step closure and the tensors that persist between steps."""

    step: Step
    model: nn.Module
    sgd: torch.optim.Optimizer

    def persistent(self) -> List[torch.Tensor]:
        """Parameters, buffers and optimizer state (momentum) of this row."""
        return [*self.model.parameters(), *self.model.buffers(), *optimizer_state(self.sgd)]


def build_model(model_name: str, norm: str, width: int) -> nn.Module:
    if model_name == "PreAct ResNet-18":
        return preact_resnet18(num_classes=10, in_channels=3, norm=norm, width=width)
    return small_cnn(num_classes=10, in_channels=3, norm=norm, width=width)


def optimizer_state(optimizer: torch.optim.Optimizer) -> List[torch.Tensor]:
    return [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]


def torch_func_step(model: nn.Module, sgd: torch.optim.SGD, adapter: PGDAT, x: torch.Tensor, y: torch.Tensor) -> None:
    """ENGM by ``vmap(grad)``: per-example gradients of every parameter, norms, weights, ``d``, SGD step."""
    x_adv = adapter.attack(model, x, y).x_adv
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss_one(p: Dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, yi.unsqueeze(0))

    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x_adv, y)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_example.values()], dim=1).norm(dim=1)
    weights = engm_weights(norms, GAMMA)
    for name, p in model.named_parameters():
        p.grad = torch.einsum("i,i...->...", weights, per_example[name]) / len(x)
    sgd.step()
    sgd.zero_grad()


def opacus_hooks_step(model: GradSampleModule, optimizer: DPOptimizer, adapter: PGDAT, x: torch.Tensor, y: torch.Tensor) -> None:
    """Opacus DP-SGD step with zero noise: attack (hooks paused inside ``pgd_linf``), mean loss, backward, step."""
    out = adapter.loss_at(model, x, y, adapter.attack(model, x, y))
    out.per_example.mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def opacus_ghost_step(
    model: GradSampleModuleFastGradientClipping,
    optimizer: DPOptimizerFastGradientClipping,
    criterion: DPLossFastGradientClipping,
    adapter: PGDAT,
    x: torch.Tensor,
    y: torch.Tensor,
) -> None:
    """Opacus fast-gradient-clipping step with zero noise: ``criterion(...).backward()`` runs both passes."""
    x_adv = adapter.attack(model, x, y).x_adv
    criterion(model(x_adv), y).backward()
    optimizer.step()
    optimizer.zero_grad()


def setup(row: str, model_name: str, norm: str, width: int, batch_size: int, device: torch.device, seed: int) -> Setup:
    """Build a fresh model, optimizer and batch for ``row``; return its step closure."""
    torch.manual_seed(seed)
    model = build_model(model_name, norm, width).to(device)
    sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(batch_size, 3, 32, 32, generator=generator).to(device)
    y = torch.randint(0, 10, (batch_size,), generator=generator).to(device)
    adapter = PGDAT(steps=10, generator=torch.Generator(device=device).manual_seed(seed))
    if row == "torch.func":
        return Setup(lambda: torch_func_step(model, sgd, adapter, x, y), model, sgd)
    if row == "Opacus hooks":
        gsm = GradSampleModule(model, loss_reduction="mean")
        dp = DPOptimizer(sgd, noise_multiplier=0.0, max_grad_norm=GAMMA, expected_batch_size=batch_size)
        return Setup(lambda: opacus_hooks_step(gsm, dp, adapter, x, y), model, sgd)
    if row == "Opacus ghost":
        fgc = GradSampleModuleFastGradientClipping(model, loss_reduction="mean", max_grad_norm=GAMMA)
        dp_fgc = DPOptimizerFastGradientClipping(
            sgd, noise_multiplier=0.0, max_grad_norm=GAMMA, expected_batch_size=batch_size, loss_reduction="mean"
        )
        criterion = DPLossFastGradientClipping(fgc, dp_fgc, nn.CrossEntropyLoss(), loss_reduction="mean")
        return Setup(lambda: opacus_ghost_step(fgc, dp_fgc, criterion, adapter, x, y), model, sgd)
    wrapped: nn.Module = model
    optimizer: torch.optim.Optimizer = sgd
    if row == "ENGM hooks":
        wrapped, optimizer = make_engm(model, sgd, gamma=GAMMA, grad_sample_mode="hooks")
    elif row == "ENGM functorch":
        wrapped, optimizer = make_engm(model, sgd, gamma=GAMMA, grad_sample_mode="functorch")
    elif row == "ENGM ghost":
        wrapped, optimizer = make_engm(model, sgd, gamma=GAMMA, grad_sample_mode="ghost")
    elif row == "cheap ENGM":
        wrapped, optimizer = make_engm(model, sgd, gamma=GAMMA, variant="input-norm", input_norm_source="attack")
    elif row != "MSGD":
        raise ValueError(f"unknown row {row!r}")
    return Setup(lambda: train_step(wrapped, optimizer, adapter, x, y), model, sgd)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_time(setups: Dict[str, Setup], repeats: int, device: torch.device) -> Dict[str, List[float]]:
    """Seconds per step of every row, ``repeats`` round-robin rounds after one warm-up round."""
    times: Dict[str, List[float]] = {name: [] for name in setups}
    for round_index in range(repeats + 1):
        for name, row in setups.items():
            synchronize(device)
            start = time.perf_counter()
            row.step()
            synchronize(device)
            if round_index > 0:
                times[name].append(time.perf_counter() - start)
    return times


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}; the CPU memory estimate needs Linux.")


def transient_bytes(step: Step, device: torch.device) -> int:
    """Peak bytes allocated during ``step`` beyond what was allocated before it."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    step()
    return (_status_kib("VmHWM") - before) * 1024


def persistent_bytes(tensors: List[torch.Tensor]) -> int:
    seen = {}
    for t in tensors:
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def group_setups(model_name: str, norm: str, rows: List[str], args: argparse.Namespace, device: torch.device) -> Dict[str, Setup]:
    """The rows of one model/norm, built on the same seeded batch."""
    width = args.width if model_name == "PreAct ResNet-18" else args.cnn_width
    return {row: setup(row, model_name, norm, width, args.batch_size, device, args.seed) for row in rows}


def group_peaks(setups: Dict[str, Setup], device: torch.device) -> Dict[str, float]:
    """Peak bytes of one step of every row (after one warm-up step each): persistent tensors plus the step's transient peak."""
    for row in setups.values():
        row.step()  # lazy one-time allocations (kernels' caches, optimizer state) are not a step's cost
    return {row: float(persistent_bytes(s.persistent()) + transient_bytes(s.step, device)) for row, s in setups.items()}


def peaks_in_child(argv: List[str]) -> Dict[str, Dict[str, float]]:
    """Run this script with ``--memory-json`` and glibc's mmap threshold fixed; return its peaks."""
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"step_cost_memory_{os.getpid()}.json"
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}  # freed tensors leave the RSS
    subprocess.run([sys.executable, __file__, *argv, "--memory-json", str(out)], env=env, check=True)
    try:
        return json.loads(out.read_text())
    finally:
        out.unlink()


def markdown(title: str, results: Dict[str, List[Tuple[str, float, float, float]]], cheap: bool) -> str:
    lines = [f"**{title}**", "", "| model / norm | method | median s/step | time x MSGD | peak memory x MSGD |", "|---|---|---:|---:|---:|"]
    for group, rows in results.items():
        for row, median, ratio, memory in rows:
            lines.append(f"| {group} | {row} | {median:.3f} | {ratio:.2f}x | {memory:.2f}x |")
        if not cheap and group.endswith("BatchNorm"):
            lines.append(f"| {group} | cheap ENGM | n/a | n/a | n/a |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--width", type=int, default=8, help="PreAct ResNet-18 base width (64 = standard)")
    parser.add_argument("--cnn-width", type=int, default=16, help="small CNN base width (16 = its default)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (>= 5)")
    parser.add_argument("--models", default="PreAct ResNet-18,small CNN", help="comma-separated subset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", type=Path, default=Path("benchmarks/results/step_cost.md"))
    parser.add_argument("--memory-json", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be >= 5 (medians of at least 5 runs)")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cheap = cheap_engm_available()
    bn_rows = [r for r in ROWS if r not in GROUP_NORM_ONLY and (cheap or r != "cheap ENGM")]
    gn_rows = [r for r in ROWS if r != "cheap ENGM"]
    groups = [
        (model_name, norm, rows, f"{model_name}, {'BatchNorm' if norm == 'batch' else 'GroupNorm'}")
        for model_name in args.models.split(",")
        for norm, rows in (("batch", bn_rows), ("group", gn_rows))
    ]
    if args.memory_json is not None:  # the child process of peaks_in_child
        peaks = {label: group_peaks(group_setups(m, n, rows, args, device), device) for m, n, rows, label in groups}
        args.memory_json.write_text(json.dumps(peaks))
        return
    medians: Dict[str, Dict[str, float]] = {}
    peaks = {}
    for model_name, norm, rows, label in groups:
        setups = group_setups(model_name, norm, rows, args, device)
        times = measure_time(setups, args.repeats, device)
        medians[label] = {row: statistics.median(values) for row, values in times.items()}
        if device.type == "cuda":
            peaks[label] = group_peaks(setups, device)
    if device.type == "cpu":
        peaks = peaks_in_child(sys.argv[1:] if argv is None else argv)
    results: Dict[str, List[Tuple[str, float, float, float]]] = {
        label: [
            (row, medians[label][row], medians[label][row] / medians[label]["MSGD"], peaks[label][row] / peaks[label]["MSGD"])
            for row in rows
        ]
        for _, _, rows, label in groups
    }
    where = f"CPU, {torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    memory = "CUDA max_memory_allocated" if device.type == "cuda" else "VmHWM-based estimate"
    title = (
        f"PGD-10 AT step, ResNet-18 width {args.width}, small CNN width {args.cnn_width}, batch {args.batch_size}, 3x32x32, {where}; "
        f"median of {args.repeats} round-robin rounds; peak memory: {memory} + persistent tensors"
    )
    table = Table(title=title)
    for header in ("model / norm", "method", "median s/step", "time x MSGD", "peak memory x MSGD"):
        table.add_column(header, justify="left" if header in ("model / norm", "method") else "right")
    for group, rows in results.items():
        for row, median, ratio, peak in rows:
            table.add_row(group, row, f"{median:.3f}", f"{ratio:.2f}x", f"{peak:.2f}x")
        if not cheap and group.endswith("BatchNorm"):
            table.add_row(group, "cheap ENGM", "n/a", "n/a", "n/a")
    Console(width=160).print(table)
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(markdown(title, results, cheap))
    print(f"markdown table written to {args.markdown}")


if __name__ == "__main__":
    main()
