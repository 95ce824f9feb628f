"""Cost of one PGD-10 adversarial-training step, side by side: MSGD, exact ENGM, ENGM (input-norm) and peers.

A benchmark, not a test. One step = the PGD-10 attack (L-inf, eps 8/255, step 2/255, random
start, ``torch.autograd.grad`` w.r.t. the input, model in train mode) + one training forward,
the method's backward pass(es), ``optimizer.step()`` and ``optimizer.zero_grad()``, on a fixed
random CIFAR-shaped batch (``3x32x32``, 10 classes; speed does not depend on pixel values).
Methods (``--methods``; rows are built in ``benchmarks/_peers.py``):

* ``msgd``: ``torch.optim.SGD(lr, momentum 0.9, weight_decay 5e-4)`` (the baseline);
* ``engm``: ``make_engm(model, SGD(...), gamma=1.0)`` and the unchanged script (one backward);
* ``engm-input-norm``: ``make_engm(..., variant="input-norm", input_grad_source="attack")`` on its
  non-calibration steps (a fixed scale, so every timed step is one): the weights come from the
  attack's last input gradient and scale the training forward's output-gradient rows;
* ``engm-input-norm-calibration``: the same with ``calibrate_every=1``: every step a calibration
  step (exact norms, book-keeping weighted gradient). The line under the table amortizes the two
  over the default ``calibrate_every`` (10): ``(calibration + 9 x non-calibration) / 10``;
* ``engm-input-norm-backward``: ``input_grad_source="backward"`` (the training loss's own input
  gradient, any loss), fixed scale: the weighted gradient is computed at ``step()``;
* ``opacus-ghost``: Opacus fast gradient clipping, noise 0, ``max_grad_norm=gamma`` (two backwards);
* ``backpack``: BackPACK ``BatchL2Grad`` norms in the training backward + a backward of ``sum_i w_i l_i / B``;
* ``functorch``: ``torch.func`` ``vmap(grad)`` per-example gradients, norms, weighted sum.

Models (``--models``): ``preact18-bn`` / ``preact18-gn``: PreAct ResNet-18 (Rice et al.) with
BatchNorm / ``GroupNorm(gcd(32, C), C)``, base width ``--width`` (64 = the standard network).

Time: per model, every method is built on the same seeded weights and batch, warmed up, then
run round-robin (one step each per round, the starting method rotating) for ``--repeats``
rounds; the table gives the median seconds per step and the median over rounds of the
method's time divided by MSGD's time in the same round (drift and load hit both alike).

Peak memory: each (model, method) runs in a fresh child process (this script with
``--memory-child``): warm-up and one step on CUDA give ``torch.cuda.max_memory_allocated``;
on CPU, the rise of the resident set's high-water mark (``VmHWM`` in ``/proc/self/status``,
``getrusage`` where it is missing) over the resident set before the model is built, with glibc's
``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors leave the resident set. Both include
parameters, optimizer state, the batch and the step's temporaries.

Usage::

    python benchmarks/step_cost.py --device cpu --width 16 --batch 64 --threads 2 --repeats 5
    python benchmarks/step_cost.py --device cuda --width 64 --batch 128 --repeats 7 --output step_cost.json
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

import torch


def _load_peers():
    """Import ``_peers.py`` next to this file (works run as a script and loaded by path from a test)."""
    name = "_step_cost_peers"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().with_name("_peers.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


peers = _load_peers()
METHODS = tuple(peers.BUILDERS)
MODELS = tuple(peers.MODEL_LABELS)
MMAP_THRESHOLD = "65536"
BASELINE = "msgd"
warnings.filterwarnings("ignore", message="Full backward hook is firing")  # first layer's input needs no grad


def names(parser: argparse.ArgumentParser, value: str, known: tuple, what: str) -> List[str]:
    """Split a comma-separated list; exit with an error listing the known names if one is unknown."""
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in known]
    if unknown or not chosen:
        parser.error(f"unknown {what} {', '.join(map(repr, unknown)) or '(none given)'}; known {what}: {', '.join(known)}")
    return list(dict.fromkeys(chosen))


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    """The command line; ``msgd`` is always added (it is every ratio's baseline)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--width", type=int, default=16, help="PreAct ResNet-18 base channels (64 = full)")
    parser.add_argument("--batch", type=int, default=64, help="batch size (64 on CPU, 128 on GPU)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed round-robin rounds (>= 5 for a measurement)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--memory-jobs", type=int, default=2, help="memory child processes run at once")
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON (atomically)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.methods = names(parser, args.methods, METHODS, "methods")
    args.models = names(parser, args.models, MODELS, "models")
    if BASELINE not in args.methods:
        args.methods.insert(0, BASELINE)
    for key in ("width", "batch", "threads", "repeats", "memory_jobs"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args


def sync(device: torch.device) -> None:
    """Wait for queued CUDA kernels (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(row, device: torch.device) -> tuple:
    """``(step seconds, outer-pass seconds)`` of one attack + outer step."""
    gc.collect()
    sync(device)
    start = time.perf_counter()
    x_adv = row.attack()
    sync(device)
    middle = time.perf_counter()
    row.outer(x_adv)
    sync(device)
    end = time.perf_counter()
    return end - start, end - middle


def failure(error: BaseException) -> str:
    """A short note for a row that raised, the traceback on stderr."""
    traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    return f"error: {type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"


def time_model(model: str, args: argparse.Namespace, device: torch.device) -> Dict[str, dict]:
    """Build every method on ``model``, warm up, run ``repeats`` rotated round-robin rounds."""
    x, y = peers.batch(args.batch, device, args.seed)
    results: Dict[str, dict] = {m: {"note": ""} for m in args.methods}
    rows = {}
    for method in args.methods:
        try:
            rows[method] = peers.build_row(method, model, args.width, x, y, args.seed)
            results[method]["note"] = rows[method].note
            for _ in range(args.warmup):
                timed_step(rows[method], device)
        except peers.NotApplicable as reason:
            results[method]["note"] = f"n/a: {reason}"
            rows.pop(method, None)
        except Exception as error:  # report and go on with the other rows
            results[method]["note"] = failure(error)
            rows.pop(method, None)
    times = {m: [] for m in rows}
    outer = {m: [] for m in rows}
    order = list(rows)
    for round_index in range(args.repeats):
        shift = round_index % len(order) if order else 0
        for method in order[shift:] + order[:shift]:
            if method not in rows:
                continue
            try:
                step_s, outer_s = timed_step(rows[method], device)
            except Exception as error:  # drop the row, keep the others
                results[method]["note"] = failure(error)
                del rows[method]
                continue
            times[method].append(step_s)
            outer[method].append(outer_s)
    for method in rows:
        results[method].update(times_s=times[method], outer_s=outer[method], median_s=statistics.median(times[method]))
        results[method]["outer_median_s"] = statistics.median(outer[method])
        if BASELINE in rows:
            ratios = [t / b for t, b in zip(times[method], times[BASELINE])]
            outer_ratios = [t / b for t, b in zip(outer[method], outer[BASELINE])]
            results[method].update(time_ratio=statistics.median(ratios), outer_ratio=statistics.median(outer_ratios))
    return results


def _status_kib(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def memory_child(args: argparse.Namespace) -> None:
    """Child process: warm the runtime on a tiny copy, then print the peak bytes of warm-up + one step as JSON."""
    model, method = args.memory_child.split(":")
    device = torch.device(args.device)
    tiny_x, tiny_y = peers.batch(2, device, args.seed)
    tiny = peers.build_row(method, model, 2, tiny_x, tiny_y, args.seed)
    tiny.outer(tiny.attack())  # imports, thread pools and one-time caches are not the step's cost
    del tiny, tiny_x, tiny_y
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        except OSError:
            pass
        base = (_status_kib("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    x, y = peers.batch(args.batch, device, args.seed)
    row = peers.build_row(method, model, args.width, x, y, args.seed)
    for _ in range(max(args.warmup, 1) + 1):
        row.outer(row.attack())
    sync(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = (_status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    print(json.dumps({"peak_bytes": peak - base}))


def peak_bytes(model: str, method: str, args: argparse.Namespace) -> tuple:
    """Run :func:`memory_child` in a fresh interpreter; ``(bytes or None, error note)``."""
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-child", f"{model}:{method}"]
    for key in ("device", "width", "batch", "threads", "warmup", "seed"):
        command += [f"--{key}", str(getattr(args, key))]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        return None, f"memory child failed ({done.stderr.strip().splitlines()[-1][:120] if done.stderr.strip() else done.returncode})"
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]), ""


def machine(device: torch.device) -> dict:
    """What ran the benchmark."""
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }


def fmt(value: Optional[float], spec: str, suffix: str = "") -> str:
    """A table cell: formatted number, or ``n/a``."""
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def print_table(rows: List[dict], title: str) -> None:
    """Print the results table (rich)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for header in ("model", "method", "median s/step", "time x MSGD", "peak MB", "memory x MSGD", "note"):
        table.add_column(header, justify="right" if header not in ("model", "method", "note") else "left")
    for r in rows:
        table.add_row(
            r["model_label"], r["label"], fmt(r.get("median_s"), ".3f"), fmt(r.get("time_ratio"), ".2f", "x"),
            fmt(r.get("peak_mb"), ".1f"), fmt(r.get("memory_ratio"), ".2f", "x"), r["note"],
        )
    Console(width=200).print(table)


CALIBRATE_EVERY = 10
"""``make_engm``'s default ``calibrate_every``: the amortization period of the input-norm variant's calibration steps."""


def amortize(rows: List[dict]) -> List[str]:
    """Per model: the input-norm variant's time ratio over ``CALIBRATE_EVERY`` steps (one calibration step)."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        ratio = {r["method"]: r.get("time_ratio") for r in rows if r["model"] == model}
        fast, calibration = ratio.get("engm-input-norm"), ratio.get("engm-input-norm-calibration")
        if fast is not None and calibration is not None:
            value = (calibration + (CALIBRATE_EVERY - 1) * fast) / CALIBRATE_EVERY
            lines.append(
                f"{peers.MODEL_LABELS[model]}: ENGM (input-norm) amortized over calibrate_every={CALIBRATE_EVERY}: "
                f"{value:.3f}x MSGD (step {fast:.3f}x, calibration step {calibration:.3f}x)"
            )
    return lines


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: Optional[List[str]] = None) -> dict:
    """Run the benchmark; print the table; write ``--output`` if given; return the results."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args)
    if args.repeats < 5:
        print(f"warning: --repeats {args.repeats} < 5: a smoke run, not a measurement", file=sys.stderr)
    device = torch.device(args.device)
    load_before = os.getloadavg()
    rows: List[dict] = []
    for model in args.models:
        timing = time_model(model, args, device)
        for method in args.methods:
            rows.append({"model": model, "model_label": peers.MODEL_LABELS[model], "method": method,
                         "label": peers.LABELS[method], **timing[method]})
    if not args.no_memory:  # children run side by side: a process's peak does not depend on its neighbours
        measured = [r for r in rows if "median_s" in r]
        with ThreadPoolExecutor(max_workers=args.memory_jobs) as pool:
            peaks = list(pool.map(lambda r: peak_bytes(r["model"], r["method"], args), measured))
        for r, (value, error) in zip(measured, peaks):
            r["peak_bytes"] = value
            r["note"] = "; ".join(filter(None, (r["note"], error)))
    for r in rows:
        base = next((b for b in rows if b["model"] == r["model"] and b["method"] == BASELINE), {})
        if r.get("peak_bytes") is not None:
            r["peak_mb"] = r["peak_bytes"] / 2**20
            if base.get("peak_bytes"):
                r["memory_ratio"] = r["peak_bytes"] / base["peak_bytes"]
    where = f"CUDA {torch.cuda.get_device_name(device)}" if device.type == "cuda" else f"CPU, {args.threads} threads"
    memory = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS rise in a fresh child"
    title = (f"PGD-10 AT step, PreAct ResNet-18 width {args.width}, batch {args.batch}, 3x32x32, {where}; "
             f"median of {args.repeats} rotated round-robin rounds after {args.warmup} warm-up; memory: {memory}")
    print_table(rows, title)
    amortized = amortize(rows)
    for line in amortized:
        print(line)
    payload = {
        "title": title,
        "command": [Path(sys.argv[0]).name if argv is None else "step_cost.py", *(sys.argv[1:] if argv is None else argv)],
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "memory_child"},
        "machine": machine(device),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "rows": rows,
        "amortized": amortized,
    }
    print(f"load average before {load_before[0]:.2f}, after {payload['load_average']['after'][0]:.2f}")
    if args.output is not None:
        write_json(args.output, payload)
        print(f"results written to {args.output}")
    return payload


if __name__ == "__main__":
    main()
