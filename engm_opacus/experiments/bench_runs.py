"""One benchmark run (train, reuse or resume; AutoAttack) and a batch of runs in parallel processes.

Each run has its own folder ``runs/<name>-<config hash>`` (:func:`run_name`). A run whose
``bench.json`` matches its config and AutoAttack budget is reused; one with ``result.json``
only gets its AutoAttack evaluation; one with ``last.pt`` only is resumed through the training
loop's ``resume``; anything else trains from scratch.

Tuning runs (phase ``tune``) return validation numbers only. The training loop always ends with
a test evaluation; a tuning run caps it at one example (``max_test_examples=1``, it only costs
time) and :func:`run_one` drops its result unread: the row of a tuning run has no test field.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from engm_opacus.experiments.bench_select import is_collapsed
from engm_opacus.training.checkpoints import load_trained_model
from engm_opacus.training.config import RESUMABLE_CHANGES, TrainConfig
from engm_opacus.training.data import limit, load_dataset, make_loader
from engm_opacus.training.evaluation import evaluate
from engm_opacus.training.logs import write_json
from engm_opacus.training.loop import train
from engm_opacus.training.runtime import resolve_device

PHASES = ("tune", "final", "gamma")
"""``tune``: lr grid on validation; ``final``: the selected settings with the final seeds; ``gamma``: the ENGM gamma study."""


@dataclass(frozen=True)
class RunSpec:
    """One training run: its phase, config, AutoAttack budget (``None``: whole test split, 0: off) and the dataset's class count."""

    phase: str
    config: TrainConfig
    autoattack_examples: Optional[int] = 0
    num_classes: int = 10


def gamma_text(gamma: Any) -> str:
    """``1``, ``0.25``: a gamma as tables and run names write it."""
    return f"{float(gamma):g}"


def config_key(config: TrainConfig) -> str:
    """A short hash of the config fields that define the run (not out_dir, resume, device, threads, progress, overwrite)."""
    fields = {k: v for k, v in asdict(config).items() if k not in RESUMABLE_CHANGES}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:10]


def run_name(spec: RunSpec) -> str:
    """``<phase>-eps<eps>-<method>-<optimizer>-lr<lr>-g<gamma>-s<seed>-<config hash>`` (gamma ``-`` for MSGD)."""
    c = spec.config
    gamma = gamma_text(c.gamma) if c.uses_engm else "-"
    return f"{spec.phase}-eps{c.eps:g}-{c.at_method}-{c.optimizer}-lr{c.lr:g}-g{gamma}-s{c.seed}-{config_key(c)}"


def autoattack_eval(config: TrainConfig, checkpoint: Path, examples: Optional[int]) -> float:
    """AutoAttack (standard) accuracy of a checkpoint's model on the first ``examples`` test examples (``None``: all); seeded by the run's seed."""
    device = resolve_device(config.device)
    model, _, _ = load_trained_model(checkpoint, device)
    splits = load_dataset(config.dataset, config.data_dir, split_seed=0)
    loader = make_loader(limit(splits.test, examples), config.batch_size, shuffle=False)
    result = evaluate(
        model, loader, eps=config.eps, step_size=config.step_size, pgd_steps=0,
        autoattack=True, device=device, max_examples=examples, seed=config.seed,
    )
    return float(result["autoattack_acc"])


def _stored_config_matches(data: Dict[str, Any], config: TrainConfig) -> bool:
    stored = {k: v for k, v in data.get("config", {}).items() if k not in RESUMABLE_CHANGES}
    wanted = {k: v for k, v in json.loads(json.dumps(asdict(config))).items() if k not in RESUMABLE_CHANGES}
    return stored == wanted


def _base_row(spec: RunSpec, config: TrainConfig) -> Dict[str, Any]:
    return {
        "phase": spec.phase, "dataset": config.dataset, "eps": config.eps, "method": config.at_method,
        "optimizer": config.optimizer, "lr": config.lr, "gamma": config.gamma if config.uses_engm else float("nan"),
        "epochs": config.epochs, "seed": config.seed,
    }


def _validation_fields(result: Dict[str, Any], num_classes: int) -> Dict[str, Any]:
    """What a run's ``result.json`` says about the validation split (and its time): never a test number."""
    history = result["history"]
    return {
        "val_pgd_best": result["best_val_pgd_acc"],
        "val_pgd_last": history[-1]["val_pgd_acc"],
        "val_clean_last": history[-1]["val_clean_acc"],
        "best_epoch": result["best_epoch"],
        "collapsed": is_collapsed(history, num_classes),
        "time_s": float(sum(record["time_s"] for record in history)),
        "val_pgd_history": [record["val_pgd_acc"] for record in history],
        "fraction_above_gamma": history[-1].get("engm_mean_fraction_above_gamma", float("nan")),
        "error": "",
    }


def _test_fields(result: Dict[str, Any]) -> Dict[str, Any]:
    last, best = result["test_last"], result["test_best"]
    return {
        "clean_last": last["clean_acc"], "pgd20_last": last["pgd_acc"], "clean_best": best["clean_acc"], "pgd20_best": best["pgd_acc"],
        "gap_pgd20": best["pgd_acc"] - last["pgd_acc"], "aa_last": float("nan"), "aa_best": float("nan"),
    }


def _failed_row(spec: RunSpec, config: TrainConfig, error: BaseException) -> Dict[str, Any]:
    """The row of a run whose optimizer raised on non-finite values: collapsed, every accuracy NaN."""
    nan = float("nan")
    row = {"val_pgd_best": nan, "val_pgd_last": nan, "val_clean_last": nan, "best_epoch": 0, "collapsed": True, "time_s": nan,
           "val_pgd_history": [], "fraction_above_gamma": nan, "error": f"{type(error).__name__}: {error}"}
    if spec.phase != "tune":
        row.update({k: nan for k in ("clean_last", "pgd20_last", "clean_best", "pgd20_best", "gap_pgd20", "aa_last", "aa_best")})
    return row


def finished_row(spec: RunSpec, runs_dir: str) -> Optional[Dict[str, Any]]:
    """The stored row of a finished run (``bench.json`` with the same config and AutoAttack budget), else ``None``."""
    run_dir = Path(runs_dir) / run_name(spec)
    bench_file = run_dir / "bench.json"
    if bench_file.exists():
        stored = json.loads(bench_file.read_text())
        if stored.get("autoattack_examples") == spec.autoattack_examples and _stored_config_matches(stored, replace(spec.config, out_dir=str(run_dir))):
            return {**stored["row"], "reused": True}
    return None


def run_one(spec: RunSpec, runs_dir: str) -> Dict[str, Any]:
    """Train (or reuse / resume) one run and return its row; ``reused`` says whether nothing had to be computed."""
    finished = finished_row(spec, runs_dir)
    if finished is not None:
        return finished
    run_dir = Path(runs_dir) / run_name(spec)
    config = replace(spec.config, out_dir=str(run_dir))
    bench_file, result_file, last = run_dir / "bench.json", run_dir / "result.json", run_dir / "last.pt"
    row = _base_row(spec, config)
    result = json.loads(result_file.read_text()) if result_file.exists() else None
    try:
        if result is None or not _stored_config_matches(result, config):
            result = train(replace(config, resume=str(last) if last.exists() else None)).to_json()
    except FloatingPointError as error:  # ENGM's on_nonfinite="raise": the run diverged
        row.update(_failed_row(spec, config, error))
    else:
        row.update(_validation_fields(result, spec.num_classes))
        if spec.phase != "tune":  # a tuning run's test numbers are never read
            row.update(_test_fields(result))
            if spec.autoattack_examples != 0:  # None: the examples PGD-20 ran on
                examples = spec.autoattack_examples if spec.autoattack_examples is not None else config.max_test_examples
                row["aa_last"] = autoattack_eval(config, last, examples)
                best_is_last = result["best_epoch"] == len(result["history"])
                row["aa_best"] = row["aa_last"] if best_is_last else autoattack_eval(config, run_dir / "best.pt", examples)
    write_json({"config": asdict(config), "autoattack_examples": spec.autoattack_examples, "row": row}, bench_file)
    return {**row, "reused": False}


def _worker_init() -> None:
    torch.set_num_threads(1)


def run_many(specs: Sequence[RunSpec], runs_dir: str, jobs: int, console: Console, title: str) -> List[Dict[str, Any]]:
    """Run (or reuse) every spec, ``jobs`` at a time in spawned processes (1 torch thread each); rows in spec order."""
    rows: List[Optional[Dict[str, Any]]] = [None] * len(specs)
    with Progress(
        TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}"),
        console=console,
    ) as progress:
        task = progress.add_task("", total=len(specs))

        def store(index: int, row: Dict[str, Any]) -> None:
            rows[index] = row
            progress.update(task, advance=1, description=f"{row['method']} {row['optimizer']} lr {row['lr']:g} seed {row['seed']}")

        todo = []
        for index, spec in enumerate(specs):  # finished runs are read here, without starting a process
            finished = finished_row(spec, runs_dir)
            if finished is not None:
                store(index, finished)
            else:
                todo.append(index)
        if jobs == 1 or len(todo) <= 1:
            for index in todo:
                store(index, run_one(specs[index], runs_dir))
        else:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_worker_init) as pool:
                futures = {pool.submit(run_one, specs[index], runs_dir): index for index in todo}
                for future in as_completed(futures):
                    store(futures[future], future.result())
    return [row for row in rows if row is not None]

