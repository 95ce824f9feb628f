"""Where a method's extra step time goes: torch.profiler of the attack and the outer pass, next to MSGD.

Companion of ``benchmarks/step_cost.py`` (same rows, from ``benchmarks/_peers.py``). For each
method it warms up, then profiles ``--steps`` steps with ``torch.profiler`` (CPU, or CPU and
CUDA), separately for the PGD-10 attack and the outer pass (training forward, backward(s),
``step()``, ``zero_grad()``), and prints:

* wall seconds per step of each part (profiler overhead included, so compare methods, not
  absolute values);
* the operators whose self time (CPU, or CUDA with ``--device cuda``) per step differs most
  from MSGD's, with their call counts; what no operator accounts for (Python: hooks, the
  optimizer's bookkeeping) is the row "(not in any operator)".

Usage::

    python benchmarks/step_profile.py --model preact18-bn --methods msgd,engm --width 16 --batch 64 --threads 2
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from collections import defaultdict
from typing import Dict, List, Optional

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # before torch: quiet the profiler's start/stop lines
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402


import _peers as peers  # noqa: E402  (run as a script: its folder is on sys.path)
warnings.filterwarnings("ignore", message="Full backward hook is firing")


def self_times(prof, cuda: bool) -> Dict[str, List[float]]:
    """``op name -> [self seconds, calls]`` of one profile (top-level and nested ops, self time only)."""
    out: Dict[str, List[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.key_averages():
        value = event.self_device_time_total if cuda else event.self_cpu_time_total
        out[event.key][0] += value / 1e6
        out[event.key][1] += event.count
    return out


def profile_part(run, steps: int, device: torch.device) -> tuple:
    """Profile ``run()`` ``steps`` times; ``(wall seconds per step, op self times per step)``."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = (time.perf_counter() - start) / steps
    ops = {k: [v[0] / steps, v[1] / steps] for k, v in self_times(prof, device.type == "cuda").items()}
    ops["(not in any operator)"] = [max(wall - sum(v[0] for v in ops.values()), 0.0), 0]
    return wall, ops


def main(argv: Optional[List[str]] = None) -> None:
    """Profile the methods on one model and print the per-part walls and the largest operator differences."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=tuple(peers.MODEL_LABELS), default="preact18-bn")
    parser.add_argument("--methods", default="msgd,engm", help=f"comma-separated, from {', '.join(peers.BUILDERS)}")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per method")
    parser.add_argument("--top", type=int, default=12, help="operators listed per method")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in peers.BUILDERS]
    if unknown:
        parser.error(f"unknown methods {', '.join(map(repr, unknown))}; known methods: {', '.join(peers.BUILDERS)}")
    if "msgd" not in methods:
        methods.insert(0, "msgd")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    x, y = peers.batch(args.batch, device, args.seed)
    rows = {method: peers.build_row(method, args.model, args.width, x, y, args.seed) for method in methods}
    for row in rows.values():  # warm-up: every row twice, then one discarded profile (the profiler's own start-up)
        for _ in range(2):
            row.outer(row.attack())
    profile_part(rows["msgd"].attack, 1, device)
    results = {}
    for method, row in rows.items():
        x_adv = row.attack()
        results[method] = {
            "attack": profile_part(row.attack, args.steps, device),
            "outer": profile_part(lambda: row.outer(x_adv), args.steps, device),
        }
    print(f"{peers.MODEL_LABELS[args.model]}, width {args.width}, batch {args.batch}, {args.device}, "
          f"{torch.get_num_threads()} threads, {args.steps} profiled steps (profiler overhead included)")
    base = results["msgd"]
    for method in methods:
        print(f"\n{peers.LABELS[method]}: attack {results[method]['attack'][0]:.3f} s "
              f"(MSGD {base['attack'][0]:.3f}), outer {results[method]['outer'][0]:.3f} s (MSGD {base['outer'][0]:.3f})")
        if method == "msgd":
            continue
        for part in ("attack", "outer"):
            ops, base_ops = results[method][part][1], base[part][1]
            diffs = sorted(
                ((ops.get(k, [0, 0])[0] - base_ops.get(k, [0, 0])[0], k) for k in set(ops) | set(base_ops)), reverse=True
            )
            print(f"  {part}: operators with the largest extra self time per step (ms; calls per step)")
            for extra, key in diffs[: args.top]:
                if abs(extra) < 1e-4:
                    break
                mine, theirs = ops.get(key, [0, 0]), base_ops.get(key, [0, 0])
                print(f"    {extra * 1e3:+8.1f}  {key:<45} {mine[0] * 1e3:8.1f} vs {theirs[0] * 1e3:8.1f}  "
                      f"({mine[1]:.0f} vs {theirs[1]:.0f} calls)")


if __name__ == "__main__":
    main()
