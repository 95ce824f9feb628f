"""``train(TrainConfig(...))``: adversarial training with ENGM (or MSGD) end to end, with checkpoints and logs.

Per epoch: one pass of :func:`engm_opacus.at.step.train_step` over the shuffled training
split (attack, mean-reduced AT loss, ``loss.backward()``, ENGM or SGD step, per-iteration LR
schedule), then clean and PGD accuracy on the validation split. Every epoch atomically rewrites
``best.pt`` when the validation PGD accuracy improves (strictly), then ``last.pt``, then
``metrics.json`` / ``metrics.csv`` (in that order, so an interruption between two writes never
leaves a ``last.pt`` that claims a best epoch ``best.pt`` does not hold). At the end the last and
the best model are evaluated on the test split (clean and PGD-``test_pgd_steps``), the result
tables are printed, then ``result.json`` is written. The robust-overfitting gap is
``best val PGD acc - last val PGD acc`` (Rice et al. 2020).

Nothing is lost: the default run folder is claimed exclusively (runs started in the same second
get ``-2``, ``-3``, ...); Ctrl-C raises :class:`~engm_opacus.training.interrupts.TrainingInterrupted` (a ``KeyboardInterrupt``)
whose message names the last checkpoint and the exact resume command; a failed write raises
:class:`~engm_opacus.training.logs.OutputError` naming the path and the errno, with the resume
command as its hint, and the previous files intact.

Resume (``resume=PATH``) restores model, optimizer (momentum buffers), scheduler, all
RNG states and the data-order generator from a checkpoint, so a run interrupted after
epoch ``k`` and resumed ends bit-identical on CPU (same thread count) to an uninterrupted
one. Checkpoints are written at epoch ends only: a run killed in the middle of epoch
``k + 1`` resumes from ``last.pt`` of epoch ``k`` and redoes that epoch identically.

Under ``torchrun --nproc_per_node N`` the run is data-parallel (:mod:`engm_opacus.training.distributed`):
every rank trains its share of each global batch, the train metrics and the validation / test
counts are summed over the ranks, and only rank 0 writes files and prints; a checkpoint holds
every rank's RNG state. ``config.amp`` selects mixed precision (:mod:`engm_opacus.training.amp`).

The defaults are this library's choice for the embedded digits set on a CPU (they are
not taken from the ENGM paper): see :class:`~engm_opacus.training.config.TrainConfig`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader

from engm_opacus.at.attacks import attack_mode
from engm_opacus.at.step import autocast_context, count_correct, train_step
from engm_opacus.training.build import Run, build_run, lr_factor
from engm_opacus.training.checkpoints import capture_rng_state, load_checkpoint, restore_model, restore_rng_state, save_checkpoint
from engm_opacus.training.config import TrainConfig, check_resume_compatible, default_out_dir, format_eps
from engm_opacus.training.display import Display, epoch_table, result_table, run_title
from engm_opacus.training.distributed import (
    Distributed, broadcast_object, broadcast_state, check_replicas, gather_objects, nproc_per_node, rank_seed, setup,
    sum_over_ranks, teardown,
)
from engm_opacus.training.evaluation import evaluate
from engm_opacus.training.interrupts import SavedCheckpoint, TrainingInterrupted, resume_command
from engm_opacus.training.logs import OutputError, claim_new_dir, write_csv, write_json
from engm_opacus.training.runtime import seed_everything, torch_threads
from engm_opacus.training.step_diagnostics import StepDiagnostics

__all__ = ["TrainResult", "clean_correct", "lr_factor", "train", "write_history"]


@dataclass
class TrainResult:
    """What :func:`train` returns (also written to ``out_dir/result.json``).

    Attributes:
        config: the run's config.
        out_dir: the run folder (``last.pt``, ``best.pt``, ``metrics.json``, ``metrics.csv``, ``result.json``).
        history: one dict per epoch (see ``metrics.json``).
        best_epoch: 1-based epoch of the best validation PGD accuracy.
        best_val_pgd_acc, last_val_pgd_acc: validation PGD accuracy of the best / last epoch.
        robust_overfitting_gap: ``best_val_pgd_acc - last_val_pgd_acc``.
        test_last, test_best: ``{"clean_acc", "pgd_acc", ...}`` of the last / best model on the test split.
        wall_time_s: seconds spent in this call.
        world_size: processes that trained (``torchrun --nproc_per_node``; 1 without it).
    """

    config: TrainConfig
    out_dir: Path
    history: List[Dict[str, Any]]
    best_epoch: int
    best_val_pgd_acc: float
    last_val_pgd_acc: float
    robust_overfitting_gap: float
    test_last: Dict[str, Any]
    test_best: Dict[str, Any]
    wall_time_s: float
    world_size: int = 1

    def to_json(self) -> Dict[str, Any]:
        """A JSON-serializable dict."""
        data = asdict(self)
        data["out_dir"] = str(self.out_dir)
        return data


def write_history(history: List[Dict[str, Any]], out_dir: Path) -> None:
    """Rewrite ``metrics.json`` (list of epoch records) and ``metrics.csv`` (one row per epoch) atomically."""
    write_json(history, out_dir / "metrics.json")
    write_csv(history, out_dir / "metrics.csv")


def clean_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Correct clean predictions in eval mode and without gradients (records nothing, BatchNorm statistics untouched)."""
    with torch.no_grad(), attack_mode(model, eval_mode=True):
        return count_correct(model(x), y)


def _resolve_out_dir(config: TrainConfig, resuming: bool) -> Optional[Path]:
    """``config.out_dir``, else the resumed checkpoint's folder; never an existing run unless allowed.

    ``None``: the default folder, claimed with :func:`~engm_opacus.training.logs.claim_new_dir` once the run is built.
    """
    if config.out_dir is not None:
        out_dir = Path(config.out_dir)
    elif config.resume is not None:
        out_dir = Path(config.resume).parent
    else:
        return None
    if not resuming and not config.overwrite and ((out_dir / "last.pt").exists() or (out_dir / "best.pt").exists()):
        raise FileExistsError(
            f"{out_dir} already holds a run (last.pt / best.pt). Fix: continue it with resume={str(out_dir / 'last.pt')!r} "
            "(--resume), choose another out_dir, or pass overwrite=True (--overwrite)."
        )
    return out_dir


def _train_epoch(run: Run, device: torch.device, display: Display, description: str) -> Dict[str, Any]:
    """One pass over the training loader: AT steps, per-iteration schedule; returns the epoch's train metrics.

    Train clean accuracy is measured before each step on the same weights, in eval mode
    (:func:`clean_correct`). Under ``torchrun`` the sums behind the train metrics are summed over
    the ranks (the progress bar shows rank 0's). ENGM diagnostics
    (:class:`~engm_opacus.training.step_diagnostics.StepDiagnostics`) are rank 0's examples.
    """
    task = display.progress.add_task(description, total=len(run.train_loader), loss=0.0, clean=0.0, robust=0.0)
    totals = {"loss": 0.0, "clean": 0, "robust": 0, "n": 0}
    diagnostics = StepDiagnostics()
    amp_skipped = 0
    lr = run.optimizer.param_groups[0]["lr"]
    run.trained_model.train()
    for x, y in run.train_loader:
        x, y = x.to(device), y.to(device)
        with autocast_context(device.type, run.autocast_dtype):
            clean = clean_correct(run.model, x, y)
        metrics = train_step(run.trained_model, run.optimizer, run.at_loss, x, y, autocast_dtype=run.autocast_dtype, scaler=run.scaler)
        run.scheduler.step()
        totals["loss"] += metrics.loss * metrics.batch_size
        totals["clean"] += clean
        totals["robust"] += metrics.robust_correct
        totals["n"] += metrics.batch_size
        amp_skipped += metrics.skipped
        diagnostics.add(run.optimizer)
        n = totals["n"]
        display.progress.update(task, advance=1, loss=totals["loss"] / n, clean=totals["clean"] / n, robust=totals["robust"] / n)
    loss, clean_total, robust, n = sum_over_ranks([totals["loss"], totals["clean"], totals["robust"], totals["n"]], run.dist)
    record = {"lr": lr, "train_loss": loss / n, "train_clean_acc": clean_total / n, "train_robust_acc": robust / n}
    if run.scaler is not None:
        record.update(amp_skipped_steps=amp_skipped, amp_scale=run.scaler.get_scale())
    return {**record, **diagnostics.record()}


def _evaluate(run: Run, loader: DataLoader, options: Dict[str, Any], *, sync_parameters: bool = False) -> Dict[str, Any]:
    """Clean and PGD accuracy of ``run.model`` on ``loader``; under ``torchrun`` each rank's shard, counts summed.

    Every rank first takes rank 0's buffers (BatchNorm statistics) and, with ``sync_parameters``,
    its parameters (after rank 0 loaded ``best.pt``), so all ranks evaluate the model rank 0 saved.
    """
    if not run.dist.enabled:
        return evaluate(run.model, loader, **options)
    broadcast_state(run.model, run.dist, parameters=sync_parameters)
    n = len(loader.dataset)  # type: ignore[arg-type]
    local = evaluate(run.model, loader, **options) if n else {"clean_acc": 0.0, "pgd_acc": 0.0}
    clean, robust, total = sum_over_ranks([round(local["clean_acc"] * n), round(local["pgd_acc"] * n), n], run.dist)
    return {"clean_acc": clean / total, "pgd_acc": robust / total, "autoattack_acc": None, "n_examples": int(total)}


def _restore(run: Run, resumed: Dict[str, Any], config: TrainConfig) -> None:
    """Model, optimizer, scheduler, GradScaler and this rank's RNG states from a loaded checkpoint (on every rank)."""
    restore_model(run.model, resumed, str(config.resume))
    run.optimizer.load_state_dict(resumed["optimizer"])
    run.scheduler.load_state_dict(resumed["scheduler"])
    if run.scaler is not None and resumed.get("scaler"):
        run.scaler.load_state_dict(resumed["scaler"])
    ranks = resumed.get("rng_ranks") or []
    if len(ranks) == run.dist.world_size:
        restore_rng_state(ranks[run.dist.rank], run.generator)
    else:  # another number of processes than the checkpoint's: rank 0's state, fresh seeds elsewhere
        restore_rng_state(resumed["rng"], run.generator)
        if run.dist.rank > 0:
            seed_everything(rank_seed(config.seed + int(resumed["epoch"]), run.dist.rank))


def train(
    config: TrainConfig,
    *,
    on_epoch_end: Optional[Callable[[Dict[str, Any]], None]] = None,
    console: Optional[Console] = None,
    print_results: Optional[bool] = None,
) -> TrainResult:
    """Adversarially train a model as ``config`` says; see the module docstring.

    Args:
        config: the run's :class:`~engm_opacus.training.config.TrainConfig`.
        on_epoch_end: called with each epoch's record after its checkpoint is written.
        console: rich console for progress and tables (default: stdout).
        print_results: print the epoch and test-result tables (before ``result.json`` is
            written); ``None``: when ``config.progress`` (the CLI passes ``True``).

    Returns:
        :class:`TrainResult`.

    Raises:
        ValueError: invalid config, or a resume config that differs from the checkpoint's.
        CheckpointError: ``config.resume`` is not a readable engm-opacus checkpoint.
        FileNotFoundError: CIFAR files absent.
        FileExistsError: ``out_dir`` already holds a run and neither ``resume`` nor ``overwrite`` is set.
        TrainingInterrupted: Ctrl-C (a ``KeyboardInterrupt``); names the last checkpoint and the resume command.
        OutputError: a write failed (full disk, no permission, read-only); names the path and the errno;
            the files written before are intact.
        RuntimeError: under ``torchrun``, the processes' parameters differ after an epoch (a bug to report).
    """
    config.validate()
    with torch_threads(config.threads):
        return _train(config, on_epoch_end, console, config.progress if print_results is None else print_results)


def _train(
    config: TrainConfig, on_epoch_end: Optional[Callable[[Dict[str, Any]], None]], console: Optional[Console], print_results: bool
) -> TrainResult:
    """:func:`train` after validation, with the thread count set: join the ``torchrun`` job (if any), train, leave it."""
    started = time.perf_counter()
    state, device = setup(config.device)
    try:
        return _train_in_job(config, state, device, on_epoch_end, console, print_results, started)
    finally:
        teardown(state)


def _train_in_job(
    config: TrainConfig,
    state: Distributed,
    device: torch.device,
    on_epoch_end: Optional[Callable[[Dict[str, Any]], None]],
    console: Optional[Console],
    print_results: bool,
    started: float,
) -> TrainResult:
    """Load the resumed checkpoint (every rank), build the run, claim the folder (rank 0), train; name the resume command on errors."""
    resumed = load_checkpoint(config.resume) if config.resume is not None else None
    if resumed is not None:
        check_resume_compatible(config, resumed["config"], str(config.resume))
    chosen_out_dir = _resolve_out_dir(config, resuming=resumed is not None)
    run = build_run(config, device, state)
    out_dir = chosen_out_dir
    if out_dir is None:
        out_dir = broadcast_object(claim_new_dir(default_out_dir(config)) if state.is_main else None, state)
    saved = SavedCheckpoint(Path(config.resume), int(resumed["epoch"])) if resumed is not None else SavedCheckpoint(None, 0)
    nproc = nproc_per_node(state)
    try:
        return _epochs_and_test(config, run, device, resumed, out_dir, saved, on_epoch_end, console, print_results and state.is_main, started)
    except KeyboardInterrupt as error:
        command = resume_command(saved.checkpoint, out_dir, nproc) if saved.checkpoint is not None else None
        raise TrainingInterrupted(saved.checkpoint, saved.epoch, command) from error
    except OutputError as error:
        if saved.checkpoint is not None and not error.hint:
            error.hint = f"after fixing it, resume from epoch {saved.epoch} with: {resume_command(saved.checkpoint, out_dir, nproc)}"
        raise


def _epochs_and_test(
    config: TrainConfig,
    run: Run,
    device: torch.device,
    resumed: Optional[Dict[str, Any]],
    out_dir: Path,
    saved: SavedCheckpoint,
    on_epoch_end: Optional[Callable[[Dict[str, Any]], None]],
    console: Optional[Console],
    print_results: bool,
    started: float,
) -> TrainResult:
    """The epochs (from the resumed one; ``saved`` follows ``last.pt``), the test evaluation, the tables, then ``result.json``.

    Only rank 0 writes and prints; every rank takes part in the evaluations and returns the same result.
    """
    history: List[Dict[str, Any]] = []
    best_val, best_epoch, start_epoch = -1.0, 0, 0
    if resumed is not None:
        _restore(run, resumed, config)
        history = list(resumed["history"])
        best_val, best_epoch, start_epoch = resumed["best_val_pgd_acc"], resumed["best_epoch"], resumed["epoch"]

    main = run.dist.is_main
    display = Display(config.progress and main, console)
    world = run.dist.world_size
    processes = f" on {world} processes (batch {config.batch_size} = {world} x {config.batch_size // world})" if world > 1 else ""
    display.print(
        f"Training {config.model} on {config.dataset} with {run_title(config)}, "
        f"eps {format_eps(config.eps)}, {config.epochs} epochs, device {device}{processes}"
        + (f", amp {config.amp}" if config.amp != "off" else "") + f" -> {out_dir}"
        + (f" (resuming after epoch {start_epoch})" if resumed is not None else "")
    )
    val_options = dict(eps=config.eps, step_size=config.step_size, pgd_steps=config.val_pgd_steps, autoattack=False, device=device)
    with display.progress:
        for epoch in range(start_epoch, config.epochs):
            epoch_start = time.perf_counter()
            run.set_epoch(epoch)
            record: Dict[str, Any] = {"epoch": epoch + 1}
            record.update(_train_epoch(run, device, display, f"epoch {epoch + 1}/{config.epochs}"))
            record["train_time_s"] = time.perf_counter() - epoch_start
            if run.dist.enabled:
                check_replicas(run.model, run.dist, epoch + 1)
            val = _evaluate(run, run.val_loader, val_options)
            record.update(val_clean_acc=float(val["clean_acc"]), val_pgd_acc=float(val["pgd_acc"]))
            record["time_s"] = time.perf_counter() - epoch_start
            history.append(record)
            improved = record["val_pgd_acc"] > best_val
            if improved:
                best_val, best_epoch = record["val_pgd_acc"], epoch + 1
            rng_ranks = gather_objects(capture_rng_state(run.generator), run.dist)
            state = {
                "epoch": epoch + 1,
                "model": run.model.state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(),
                "rng": rng_ranks[0],
                "best_val_pgd_acc": best_val,
                "best_epoch": best_epoch,
                "history": history,
                "config": asdict(config),
                "world_size": run.dist.world_size,
            }
            if run.scaler is not None:
                state["scaler"] = run.scaler.state_dict()
            if run.dist.enabled:
                state["rng_ranks"] = rng_ranks
            if main:
                if improved:
                    save_checkpoint(state, out_dir / "best.pt")
                save_checkpoint(state, out_dir / "last.pt")
                write_history(history, out_dir)
            saved.checkpoint, saved.epoch = out_dir / "last.pt", epoch + 1
            display.print(
                f"epoch {epoch + 1}/{config.epochs}: train loss {record['train_loss']:.3f}, "
                f"val clean {record['val_clean_acc']:.1%}, val PGD-{config.val_pgd_steps} {record['val_pgd_acc']:.1%}"
            )
            if on_epoch_end is not None:
                on_epoch_end(record)

    test_options = dict(val_options, pgd_steps=config.test_pgd_steps)
    test_last = _evaluate(run, run.test_loader, test_options)
    if main:
        best_path = out_dir / "best.pt"
        restore_model(run.model, load_checkpoint(best_path, map_location=device), best_path)
    test_best = _evaluate(run, run.test_loader, test_options, sync_parameters=True)
    result = TrainResult(
        config=config,
        out_dir=out_dir,
        history=history,
        best_epoch=best_epoch,
        best_val_pgd_acc=best_val,
        last_val_pgd_acc=history[-1]["val_pgd_acc"],
        robust_overfitting_gap=best_val - history[-1]["val_pgd_acc"],
        test_last={k: v for k, v in test_last.items() if v is not None},
        test_best={k: v for k, v in test_best.items() if v is not None},
        wall_time_s=time.perf_counter() - started,
        world_size=run.dist.world_size,
    )
    if print_results:  # before the write: a full disk must not cost the numbers
        display.console.print(epoch_table(history))
        display.console.print(result_table(config, len(history), best_epoch, result.test_last, result.test_best))
        display.console.print(
            f"Robust-overfitting gap (best - last val PGD acc): {result.robust_overfitting_gap:.2%}. "
            f"Wall time {result.wall_time_s:.1f} s. Logs and checkpoints in {out_dir}"
        )
    if main:
        write_json(result.to_json(), out_dir / "result.json")
    return result
