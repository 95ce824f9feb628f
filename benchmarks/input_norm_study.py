"""How well does the input-norm variant track exact ENGM, per AT method, input-gradient source and calibration period K?

A benchmark, not a test. For each AT method, a small CNN is trained on digits by **exact** ENGM
(``gamma``, lr 0.5, batch 64, PGD-``--pgd-steps``, piecewise schedule). At every step, per example
``i`` of the batch, it records:

* ``n_i``: the exact per-example gradient norm (``optimizer.last_step``);
* ``m_i`` for the two sources of :func:`engm_opacus.make_engm`'s ``input_grad_source``:
  ``backward``: ``||grad_x L||`` of the training loss over all of the loss's model calls (TRADES,
  MART: clean and adversarial); ``attack``: the attack's last input gradient. Both are read by a
  probe module around the wrapped model, independently of the library's own taps.

Then the estimator ``n_i ~= s m_i`` is replayed offline on that trajectory for each ``K``
(calibrate on step 0 and every K steps: ``s <- quantile_q(n/m)`` first (``q`` = 0.5, the median, and 0.9), then the geometric running
average with ``beta = 0.5``; calibration steps use exact norms), and on the non-calibration steps it
reports: the median relative error ``|s m_i - n_i| / n_i``; the share of examples whose weight
``w = 1/max(., gamma)`` is more than 2x too large (``max(n, gamma) / max(s m, gamma) > 2``: large-norm
examples that escape normalization and contribute ``n_i / max(s m_i, gamma) > 1`` instead of at most
1, what makes a step too long) and more than 2x too small; the 99th percentile of that
over-weighting factor; and the per-step Pearson correlation of ``n`` and ``m`` (median over steps).

Usage::

    python benchmarks/input_norm_study.py --epochs 10 --eps 8/255 0.2 --output study.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from engm_opacus import make_engm
from engm_opacus.at.losses import at_method_names, get_at_loss
from engm_opacus.at.step import train_step
from engm_opacus.training.data import load_dataset, make_loader
from engm_opacus.training.logs import atomic_write_text
from engm_opacus.training.models import build_model

SOURCES = ("backward", "attack")
METHODS = ("pgd-at", "trades", "mart", "awp-pgd-at")
PERIODS = (1, 2, 5, 10, 20, 50, 100000)
BETA = 0.5


class Probe(nn.Module):
    """Around the ENGM-wrapped model: keeps the per-row input-gradient norms of the attack's last call and of
    the training loss (sum of squares over the loss's calls)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.attack_norms: Optional[torch.Tensor] = None
        self.training_squares: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.inner(x)
        if x.requires_grad:
            x = x.view_as(x)
            x.register_hook(self._attack)
        else:
            x = x.detach().requires_grad_(True)
            x.register_hook(self._training)
        return self.inner(x)

    def _attack(self, grad: torch.Tensor) -> None:
        self.attack_norms = grad.detach().flatten(1).double().norm(dim=1)

    def _training(self, grad: torch.Tensor) -> None:
        squares = grad.detach().flatten(1).double().square().sum(1)
        self.training_squares = squares if self.training_squares is None else self.training_squares + squares


def record(method: str, eps: float, args: argparse.Namespace) -> List[Dict[str, torch.Tensor]]:
    """Train by exact ENGM; per step ``{"exact": n, "backward": m, "attack": m}``."""
    torch.manual_seed(args.seed)
    splits = load_dataset("digits", split_seed=0)
    model = build_model("small-cnn", num_classes=splits.num_classes, in_channels=splits.in_channels)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    wrapped, optimizer = make_engm(model, optimizer, gamma=args.gamma)
    probe = Probe(wrapped)
    at_loss = get_at_loss(method, eps=eps, step_size=eps / 4, steps=args.pgd_steps)
    loader = make_loader(splits.train, 64, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    steps_per_epoch = len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer.original_optimizer, lambda t: 1.0 if t < 0.5 * args.epochs * steps_per_epoch else 0.1 if t < 0.75 * args.epochs * steps_per_epoch else 0.01
    )
    trajectory = []
    for _ in range(args.epochs):
        for x, y in loader:
            probe.attack_norms, probe.training_squares = None, None
            train_step(probe, optimizer, at_loss, x, y)
            scheduler.step()
            trajectory.append(
                {"exact": optimizer.last_step.per_example_norms.double(), "attack": probe.attack_norms, "backward": probe.training_squares.sqrt()}
            )
    return trajectory


def replay(trajectory: List[Dict[str, torch.Tensor]], source: str, period: int, gamma: float, quantile: float) -> Dict[str, float]:
    """The estimator on the recorded trajectory, calibrating every ``period`` steps to the ``quantile`` of ``n/m``;
    metrics over the other steps."""
    scale = None
    errors, overweighted, underweighted, factors = [], [], [], []
    for t, entry in enumerate(trajectory):
        exact, m = entry["exact"], entry[source]
        if t % period == 0:
            usable = (m > 0) & (exact > 0)
            fitted = float(torch.quantile(exact[usable] / m[usable], quantile))
            scale = fitted if scale is None else math.exp((1 - BETA) * math.log(scale) + BETA * math.log(fitted))
            continue
        estimate = scale * m
        errors.append((estimate - exact).abs() / exact)
        factor = exact.clamp(min=gamma) / estimate.clamp(min=gamma)
        factors.append(factor)
        overweighted.append((factor > 2).double())
        underweighted.append((factor < 0.5).double())
    if not errors:
        nan = float("nan")
        return {"median_rel_error": nan, "share_overweighted_2x": nan, "share_underweighted_2x": nan, "overweight_p99": nan}
    return {
        "median_rel_error": float(torch.cat(errors).median()),
        "share_overweighted_2x": float(torch.cat(overweighted).mean()),
        "share_underweighted_2x": float(torch.cat(underweighted).mean()),
        "overweight_p99": float(torch.quantile(torch.cat(factors), 0.99)),
    }


def pearson(trajectory: List[Dict[str, torch.Tensor]], source: str) -> float:
    values = []
    for entry in trajectory:
        stacked = torch.stack([entry["exact"], entry[source]])
        if float(stacked.std(dim=1).min()) > 0:
            values.append(float(torch.corrcoef(stacked)[0, 1]))
    return statistics.median(values)


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=at_method_names())
    parser.add_argument("--eps", nargs="+", type=lambda v: float(Fraction(v)), default=[8 / 255, 0.2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--pgd-steps", type=int, default=10)
    parser.add_argument("--gamma", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--periods", nargs="+", type=int, default=list(PERIODS))
    parser.add_argument("--calibration-quantiles", nargs="+", type=float, default=[0.5, 0.9])
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for eps in args.eps:
        for method in args.methods:
            started = time.perf_counter()
            trajectory = record(method, eps, args)
            for source in SOURCES:
                correlation = pearson(trajectory, source)
                for quantile in args.calibration_quantiles:
                    for period in args.periods:
                        row = {"eps": eps, "method": method, "source": source, "K": period, "quantile": quantile,
                               "pearson": correlation, **replay(trajectory, source, period, args.gamma, quantile)}
                        rows.append(row)
                        print(f"eps {eps:.4g} {method:11s} {source:8s} q={quantile:<4g} K={period:<6d} r={correlation:.3f} "
                              f"median rel err {row['median_rel_error']:.3f}  over>2x {row['share_overweighted_2x']:.4f}  "
                              f"under>2x {row['share_underweighted_2x']:.4f}  p99 over factor {row['overweight_p99']:.2f}", flush=True)
            print(f"  ({len(trajectory)} steps, {time.perf_counter() - started:.0f} s)", flush=True)
    payload = {"command": ["input_norm_study.py", *(sys.argv[1:] if argv is None else argv)], "rows": rows}
    if args.output is not None:
        atomic_write_text(json.dumps(payload, indent=2), args.output)
    return payload


if __name__ == "__main__":
    main()
