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

The defaults are this library's choice for the embedded digits set on a CPU (they are
not taken from the ENGM paper): see :class:`~engm_opacus.training.config.TrainConfig`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader

from engm_opacus.at.attacks import attack_mode
from engm_opacus.at.losses import get_at_loss
from engm_opacus.at.step import count_correct, train_step
from engm_opacus.training.checkpoints import capture_rng_state, load_checkpoint, restore_model, restore_rng_state, save_checkpoint
from engm_opacus.training.config import VARIANTS, TrainConfig, check_resume_compatible, default_out_dir, format_eps
from engm_opacus.training.data import limit, load_dataset, make_loader
from engm_opacus.training.display import Display, epoch_table, result_table, run_title
from engm_opacus.training.evaluation import evaluate
from engm_opacus.training.interrupts import SavedCheckpoint, TrainingInterrupted, resume_command
from engm_opacus.training.logs import OutputError, claim_new_dir, write_csv, write_json
from engm_opacus.training.models import build_model
from engm_opacus.training.runtime import resolve_device, seed_everything, torch_threads
from engm_opacus.training.step_diagnostics import StepDiagnostics
from engm_opacus.wrap import make_engm


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

    def to_json(self) -> Dict[str, Any]:
        """A JSON-serializable dict."""
        data = asdict(self)
        data["out_dir"] = str(self.out_dir)
        return data


def lr_factor(schedule: str, epochs: int, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the base LR after ``t`` iterations (for ``torch.optim.lr_scheduler.LambdaLR``).

    ``piecewise``: 1 before 50% of the epochs, 0.1 before 75%, then 0.01.
    ``cosine``: ``0.5 (1 + cos(pi t / (epochs * steps_per_epoch)))``.
    """
    total = epochs * steps_per_epoch

    def piecewise(t: int) -> float:
        epoch = t / steps_per_epoch
        return 1.0 if epoch < 0.5 * epochs else 0.1 if epoch < 0.75 * epochs else 0.01

    def cosine(t: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))

    return piecewise if schedule == "piecewise" else cosine


def write_history(history: List[Dict[str, Any]], out_dir: Path) -> None:
    """Rewrite ``metrics.json`` (list of epoch records) and ``metrics.csv`` (one row per epoch) atomically."""
    write_json(history, out_dir / "metrics.json")
    write_csv(history, out_dir / "metrics.csv")


def clean_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Correct clean predictions in eval mode and without gradients (records nothing, BatchNorm statistics untouched)."""
    with torch.no_grad(), attack_mode(model, eval_mode=True):
        return count_correct(model(x), y)


@dataclass
class _Run:
    """The objects one run trains with; ``trained_model`` is ``model`` or its ENGM wrapper."""

    model: nn.Module
    trained_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    at_loss: Any
    generator: torch.Generator
    train_loader: DataLoader
    val_loader: DataLoader
    test_loader: DataLoader


def _build_run(config: TrainConfig, device: torch.device) -> _Run:
    """Seed, load data, build the model, the (ENGM-wrapped) SGD, the schedule and the AT loss."""
    seed_everything(config.seed)
    splits = load_dataset(config.dataset, config.data_dir, split_seed=0)
    model = build_model(
        config.model, num_classes=splits.num_classes, in_channels=splits.in_channels, norm=config.norm, width=config.width
    ).to(device)
    sgd = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=config.nesterov
    )
    trained_model: nn.Module = model
    optimizer: torch.optim.Optimizer = sgd
    if config.uses_engm:
        trained_model, optimizer = make_engm(
            model, sgd, gamma=config.gamma, variant=VARIANTS[config.optimizer], **config.engm_options
        )
    at_loss = get_at_loss(
        config.at_method, eps=config.eps, step_size=config.step_size, steps=config.pgd_steps,
        attack_eval_mode=config.attack_eval_mode, **config.at_options,
    )
    generator = torch.Generator().manual_seed(config.seed)
    train_loader = make_loader(limit(splits.train, config.max_train_examples), config.batch_size, shuffle=True, generator=generator)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config.schedule, config.epochs, len(train_loader)))
    return _Run(
        model, trained_model, optimizer, scheduler, at_loss, generator, train_loader,
        make_loader(limit(splits.val, config.max_val_examples), config.batch_size, shuffle=False),
        make_loader(limit(splits.test, config.max_test_examples), config.batch_size, shuffle=False),
    )


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


def _train_epoch(run: _Run, device: torch.device, display: Display, description: str) -> Dict[str, Any]:
    """One pass over the training loader: AT steps, per-iteration schedule; returns the epoch's train metrics.

    Train clean accuracy is measured before each step on the same weights, in eval mode
    (:func:`clean_correct`). ENGM diagnostics: :class:`~engm_opacus.training.step_diagnostics.StepDiagnostics`.
    """
    task = display.progress.add_task(description, total=len(run.train_loader), loss=0.0, clean=0.0, robust=0.0)
    totals = {"loss": 0.0, "clean": 0, "robust": 0, "n": 0}
    diagnostics = StepDiagnostics()
    lr = run.optimizer.param_groups[0]["lr"]
    run.trained_model.train()
    for x, y in run.train_loader:
        x, y = x.to(device), y.to(device)
        clean = clean_correct(run.model, x, y)
        metrics = train_step(run.trained_model, run.optimizer, run.at_loss, x, y)
        run.scheduler.step()
        totals["loss"] += metrics.loss * metrics.batch_size
        totals["clean"] += clean
        totals["robust"] += metrics.robust_correct
        totals["n"] += metrics.batch_size
        diagnostics.add(run.optimizer)
        n = totals["n"]
        display.progress.update(task, advance=1, loss=totals["loss"] / n, clean=totals["clean"] / n, robust=totals["robust"] / n)
    return {
        "lr": lr,
        "train_loss": totals["loss"] / totals["n"],
        "train_clean_acc": totals["clean"] / totals["n"],
        "train_robust_acc": totals["robust"] / totals["n"],
        **diagnostics.record(),
    }


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
    """
    config.validate()
    with torch_threads(config.threads):
        return _train(config, on_epoch_end, console, config.progress if print_results is None else print_results)


def _train(
    config: TrainConfig, on_epoch_end: Optional[Callable[[Dict[str, Any]], None]], console: Optional[Console], print_results: bool
) -> TrainResult:
    """:func:`train` after validation, with the thread count set."""
    started = time.perf_counter()
    device = resolve_device(config.device)
    resumed = load_checkpoint(config.resume) if config.resume is not None else None
    if resumed is not None:
        check_resume_compatible(config, resumed["config"], str(config.resume))
    chosen_out_dir = _resolve_out_dir(config, resuming=resumed is not None)
    run = _build_run(config, device)
    out_dir = chosen_out_dir if chosen_out_dir is not None else claim_new_dir(default_out_dir(config))
    saved = SavedCheckpoint(Path(config.resume), int(resumed["epoch"])) if resumed is not None else SavedCheckpoint(None, 0)
    try:
        return _epochs_and_test(config, run, device, resumed, out_dir, saved, on_epoch_end, console, print_results, started)
    except KeyboardInterrupt as error:
        command = resume_command(saved.checkpoint, out_dir) if saved.checkpoint is not None else None
        raise TrainingInterrupted(saved.checkpoint, saved.epoch, command) from error
    except OutputError as error:
        if saved.checkpoint is not None and not error.hint:
            error.hint = f"after fixing it, resume from epoch {saved.epoch} with: {resume_command(saved.checkpoint, out_dir)}"
        raise


def _epochs_and_test(
    config: TrainConfig,
    run: _Run,
    device: torch.device,
    resumed: Optional[Dict[str, Any]],
    out_dir: Path,
    saved: SavedCheckpoint,
    on_epoch_end: Optional[Callable[[Dict[str, Any]], None]],
    console: Optional[Console],
    print_results: bool,
    started: float,
) -> TrainResult:
    """The epochs (from the resumed one; ``saved`` follows ``last.pt``), the test evaluation, the tables, then ``result.json``."""
    history: List[Dict[str, Any]] = []
    best_val, best_epoch, start_epoch = -1.0, 0, 0
    if resumed is not None:
        restore_model(run.model, resumed, str(config.resume))
        run.optimizer.load_state_dict(resumed["optimizer"])
        run.scheduler.load_state_dict(resumed["scheduler"])
        restore_rng_state(resumed["rng"], run.generator)
        history = list(resumed["history"])
        best_val, best_epoch, start_epoch = resumed["best_val_pgd_acc"], resumed["best_epoch"], resumed["epoch"]

    display = Display(config.progress, console)
    display.print(
        f"Training {config.model} on {config.dataset} with {run_title(config)}, "
        f"eps {format_eps(config.eps)}, {config.epochs} epochs, device {device} -> {out_dir}"
        + (f" (resuming after epoch {start_epoch})" if resumed is not None else "")
    )
    val_options = dict(eps=config.eps, step_size=config.step_size, pgd_steps=config.val_pgd_steps, autoattack=False, device=device)
    with display.progress:
        for epoch in range(start_epoch, config.epochs):
            epoch_start = time.perf_counter()
            record: Dict[str, Any] = {"epoch": epoch + 1}
            record.update(_train_epoch(run, device, display, f"epoch {epoch + 1}/{config.epochs}"))
            record["train_time_s"] = time.perf_counter() - epoch_start
            val = evaluate(run.model, run.val_loader, **val_options)
            record.update(val_clean_acc=float(val["clean_acc"]), val_pgd_acc=float(val["pgd_acc"]))
            record["time_s"] = time.perf_counter() - epoch_start
            history.append(record)
            improved = record["val_pgd_acc"] > best_val
            if improved:
                best_val, best_epoch = record["val_pgd_acc"], epoch + 1
            state = {
                "epoch": epoch + 1,
                "model": run.model.state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(),
                "rng": capture_rng_state(run.generator),
                "best_val_pgd_acc": best_val,
                "best_epoch": best_epoch,
                "history": history,
                "config": asdict(config),
            }
            if improved:
                save_checkpoint(state, out_dir / "best.pt")
            saved.checkpoint, saved.epoch = save_checkpoint(state, out_dir / "last.pt"), epoch + 1
            write_history(history, out_dir)
            display.print(
                f"epoch {epoch + 1}/{config.epochs}: train loss {record['train_loss']:.3f}, "
                f"val clean {record['val_clean_acc']:.1%}, val PGD-{config.val_pgd_steps} {record['val_pgd_acc']:.1%}"
            )
            if on_epoch_end is not None:
                on_epoch_end(record)

    test_options = dict(val_options, pgd_steps=config.test_pgd_steps)
    test_last = evaluate(run.model, run.test_loader, **test_options)
    best_path = out_dir / "best.pt"
    restore_model(run.model, load_checkpoint(best_path, map_location=device), best_path)
    test_best = evaluate(run.model, run.test_loader, **test_options)
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
    )
    if print_results:  # before the write: a full disk must not cost the numbers
        display.console.print(epoch_table(history))
        display.console.print(result_table(config, len(history), best_epoch, result.test_last, result.test_best))
        display.console.print(
            f"Robust-overfitting gap (best - last val PGD acc): {result.robust_overfitting_gap:.2%}. "
            f"Wall time {result.wall_time_s:.1f} s. Logs and checkpoints in {out_dir}"
        )
    write_json(result.to_json(), out_dir / "result.json")
    return result
