"""``engm_opacus.train(TrainConfig(...))``: adversarial training with ENGM (or MSGD) end to end.

Per epoch: one pass of :func:`engm_opacus.step.train_step` over the shuffled training
split (attack, per-example AT losses, ENGM or SGD step, per-iteration LR schedule), then
clean and PGD accuracy on the validation split. Every epoch appends a record to
``metrics.json`` / ``metrics.csv`` and atomically rewrites ``last.pt``; ``best.pt`` is
rewritten when the validation PGD accuracy improves (strictly). At the end the last and
the best model are evaluated on the test split (clean and PGD-``test_pgd_steps``) and
``result.json`` is written. The robust-overfitting gap is
``best val PGD acc - last val PGD acc`` (Rice et al. 2020).

Resume (``resume=PATH``) restores model, optimizer (momentum buffers), scheduler, all
RNG states and the data-order generator from a checkpoint, so a run interrupted after
epoch ``k`` and resumed ends bit-identical on CPU (same thread count) to an uninterrupted
one. Checkpoints are written at epoch ends only: a run killed in the middle of epoch
``k + 1`` resumes from ``last.pt`` of epoch ``k`` and redoes that epoch identically.

The defaults are this library's choice for the embedded digits set on a CPU (they are
not taken from the ENGM paper): see :class:`TrainConfig`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader

from engm_opacus.attacks import attack_mode, per_example_hooks_paused, validate_threat_model
from engm_opacus.checkpoints import CheckpointError, atomic_write_text, capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from engm_opacus.data import DATASET_SHAPES, DATASETS, limit, load_dataset, make_loader
from engm_opacus.evaluation import evaluate
from engm_opacus.losses import at_method_names, get_at_loss
from engm_opacus.models import MODELS, NORMS, build_model
from engm_opacus.step import train_step
from engm_opacus.weights import validate_gamma
from engm_opacus.wrap import make_engm

OPTIMIZERS: Tuple[str, ...] = ("engm", "msgd")
SCHEDULES: Tuple[str, ...] = ("piecewise", "cosine")
DEVICES: Tuple[str, ...] = ("auto", "cpu", "cuda")
DEFAULT_LR: Dict[str, float] = {"engm": 0.5, "msgd": 0.1}
"""Base learning rate per optimizer when ``TrainConfig.lr`` is ``None`` (measured on digits, see :class:`TrainConfig`)."""
RESUMABLE_CHANGES: Tuple[str, ...] = ("resume", "out_dir", "device", "threads", "progress", "overwrite")
"""Config fields that may differ between a checkpoint and the run resuming it."""


@dataclass
class TrainConfig:
    """Everything one training run depends on (saved in every checkpoint).

    Defaults (this library's choice for the embedded digits set on a CPU; not the paper's,
    whose constants could not be read): small CNN (GroupNorm, width 16) on 16x16 digits,
    PGD-AT with the usual eps 8/255, step 2/255, 10 steps; ENGM with ``gamma=1`` and
    ``lr=0.5`` (MSGD: ``lr=0.1``, the AT convention), momentum 0.9, weight decay 5e-4,
    batch 32 (digits has 1,257 training images: 40 steps per epoch), 10 epochs, piecewise
    schedule (/10 at 50% and 75% of the epochs).

    Why ``gamma=1``: with these defaults the per-example gradient norms measured on digits
    (``engm_mean_median_norm`` / ``engm_mean_fraction_above_gamma`` in ``metrics.json``) have
    a median of about 6 in epoch 1 (64% of the examples above 1), then fall to about 0.01 with
    a heavy tail: 8-20% of the examples stay above 1 in epochs 4-10. ``gamma=1`` thus
    normalizes the examples with large gradients throughout while the well-fit majority
    enters with weight 1 (as in MSGD). In 10-epoch runs (seed 0, test clean / PGD-20
    accuracy) ENGM reached 97.8% / 93.1% with ``lr=0.2`` and 98.1% / 93.6% with ``lr=0.5``;
    MSGD 97.8% / 93.6% with ``lr=0.1`` (the reference codebases' value) and 98.3% / 94.2%
    with ``0.05``: on digits at eps 8/255 both optimizers saturate, within a few test images.

    Attributes:
        dataset: ``digits`` | ``cifar10`` | ``cifar100``.
        data_dir: folder with the CIFAR files (not used by digits).
        model: ``small-cnn`` | ``preact-resnet18`` | ``wrn-34-10``.
        norm: ``group`` | ``batch`` (see :mod:`engm_opacus.models`).
        width: model width override (``None``: the standard width).
        at_method: an AT loss name of :func:`engm_opacus.losses.get_at_loss`.
        at_options: extra keyword arguments of the AT loss (e.g. ``{"beta": 6.0}``).
        attack_eval_mode: attack with the model in eval mode during training.
        optimizer: ``engm`` or ``msgd`` (plain momentum SGD on the mean loss, the baseline).
        gamma: ENGM normalization floor in ``w_i = 1/max(||g_i||, gamma)``.
        engm_mode: ``grad_sample_mode`` passed to :func:`engm_opacus.make_engm` (``hooks``, ...).
        engm_variant: ``variant`` passed to ``make_engm`` when not ``None``.
        engm_options: further keyword arguments of ``make_engm``.
        lr: base learning rate; ``None`` resolves (in :meth:`validate`) to :data:`DEFAULT_LR` of
            the optimizer: the update sizes of ENGM and MSGD differ (ENGM's direction has norm
            at most ``1/gamma``-scaled per example), so each gets its own default.
        momentum, weight_decay, nesterov: ``torch.optim.SGD`` hyper-parameters.
        schedule: ``piecewise`` (factor 1, 0.1, 0.01 from 0%, 50%, 75% of the epochs: 100/150 of 200)
            or ``cosine`` (``0.5 (1 + cos(pi t / T))``); both stepped every iteration.
        epochs, batch_size, seed: the usual; ``seed`` seeds init, data order and attacks.
        device: ``auto`` (CUDA if available) | ``cpu`` | ``cuda``.
        threads: CPU threads of torch's intra-op parallelism during the run
            (``torch.set_num_threads``, restored afterwards); ``None`` keeps torch's setting. The
            default 1 suits the small default model: 2 epochs of the default digits run took
            18 s on 1 thread and 135-160 s on 2 threads on a 2-core machine shared with other
            jobs. Use ``None`` (or more threads) for ResNets on a CPU. Bit-identical resume
            assumes the same thread count.
        eps, step_size, pgd_steps: the training attack (L-infinity, inputs in [0, 1]).
        val_pgd_steps: PGD steps of the per-epoch validation attack.
        test_pgd_steps: PGD steps of the final test evaluation (PGD-20).
        max_train_examples, max_val_examples, max_test_examples: subset sizes (``None``: all).
        out_dir: run folder (``None``: ``runs/<UTC time>-<dataset>-<optimizer>-<at_method>``,
            or the checkpoint's folder when resuming).
        resume: a checkpoint to continue from.
        overwrite: allow starting a fresh run in an ``out_dir`` that already has checkpoints.
        progress: show rich progress bars and tables.
    """

    dataset: str = "digits"
    data_dir: Optional[str] = None
    model: str = "small-cnn"
    norm: str = "group"
    width: Optional[int] = None
    at_method: str = "pgd-at"
    at_options: Dict[str, Any] = field(default_factory=dict)
    attack_eval_mode: bool = False
    optimizer: str = "engm"
    gamma: float = 1.0
    engm_mode: str = "hooks"
    engm_variant: Optional[str] = None
    engm_options: Dict[str, Any] = field(default_factory=dict)
    lr: Optional[float] = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "piecewise"
    epochs: int = 10
    batch_size: int = 32
    seed: int = 0
    device: str = "auto"
    threads: Optional[int] = 1
    eps: float = 8 / 255
    step_size: float = 2 / 255
    pgd_steps: int = 10
    val_pgd_steps: int = 10
    test_pgd_steps: int = 20
    max_train_examples: Optional[int] = None
    max_val_examples: Optional[int] = None
    max_test_examples: Optional[int] = None
    out_dir: Optional[str] = None
    resume: Optional[str] = None
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> "TrainConfig":
        """Raise ``ValueError`` naming the valid choices for any bad field; resolve ``lr=None``; return ``self``."""
        choices = {
            "dataset": DATASETS,
            "model": tuple(MODELS),
            "norm": NORMS,
            "at_method": at_method_names(),
            "optimizer": OPTIMIZERS,
            "schedule": SCHEDULES,
            "device": DEVICES,
        }
        for name, valid in choices.items():
            value = getattr(self, name)
            if value not in valid:
                raise ValueError(f"Unknown {name} {value!r}. Fix: use one of {', '.join(valid)}.")
        validate_threat_model(self.eps, self.step_size, self.pgd_steps)
        validate_threat_model(self.eps, self.step_size, self.val_pgd_steps)
        validate_threat_model(self.eps, self.step_size, self.test_pgd_steps)
        if self.optimizer == "engm":
            validate_gamma(self.gamma)
        positive = {"epochs": self.epochs, "batch_size": self.batch_size}
        for name in ("max_train_examples", "max_val_examples", "max_test_examples", "width", "threads"):
            if getattr(self, name) is not None:
                positive[name] = getattr(self, name)
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.optimizer]
        for name in ("lr", "momentum", "weight_decay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise ValueError(f"{name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, got {value!r}.")
        return self


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


@contextlib.contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside the block (``None``: unchanged); the old count is restored after."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def format_eps(eps: float) -> str:
    """``8/255`` when ``eps`` is a whole number of 1/255 steps, else ``eps`` to 4 digits."""
    steps = eps * 255
    return f"{round(steps)}/255" if abs(steps - round(steps)) < 1e-9 else f"{eps:.4g}"


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA if available else CPU; ``cuda`` without a GPU raises ``ValueError``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA GPU. Fix: use device='cpu' or 'auto'.")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed torch, NumPy and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


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


def check_resume_compatible(config: TrainConfig, saved: Dict[str, Any], path: str) -> None:
    """Raise ``ValueError`` if ``config`` differs from the checkpoint's config outside :data:`RESUMABLE_CHANGES`."""
    current = asdict(config)
    differences = [
        f"{name}: checkpoint {saved.get(name)!r}, now {current[name]!r}"
        for name in current
        if name not in RESUMABLE_CHANGES and saved.get(name) != current[name]
    ]
    if differences:
        raise ValueError(
            f"Cannot resume from {path}: the config differs from the one it was trained with ({'; '.join(differences)}). "
            "Fix: resume with the checkpoint's settings (the CLI takes them from the checkpoint when you only pass "
            "--resume), or start a new run."
        )


def config_from_payload(payload: Dict[str, Any]) -> TrainConfig:
    """The :class:`TrainConfig` stored in a loaded checkpoint (fields this version does not know are dropped)."""
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{key: value for key, value in payload["config"].items() if key in known})


def config_from_checkpoint(path: str) -> TrainConfig:
    """The :class:`TrainConfig` stored in a checkpoint (validated load; see :func:`load_checkpoint`)."""
    return config_from_payload(load_checkpoint(path))


def load_trained_model(path: str, device: torch.device | str = "cpu") -> Tuple[nn.Module, TrainConfig, Dict[str, Any]]:
    """Rebuild the model a checkpoint was trained with and load its weights.

    Returns:
        ``(model in eval mode on device, its TrainConfig, the checkpoint payload)``.

    Raises:
        CheckpointError: unreadable or foreign file, or weights that do not fit the recorded model.
    """
    payload = load_checkpoint(path, map_location=device)
    config = config_from_payload(payload)
    num_classes, in_channels, _ = DATASET_SHAPES[config.dataset]
    model = build_model(config.model, num_classes=num_classes, in_channels=in_channels, norm=config.norm, width=config.width)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as error:
        raise CheckpointError(f"Checkpoint {path} has weights that do not fit its recorded model {config.model!r}: {error}") from error
    return model.to(device).eval(), config, payload


def default_out_dir(config: TrainConfig) -> Path:
    """``runs/<UTC time>-<dataset>-<optimizer>-<at_method>``."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{config.dataset}-{config.optimizer}-{config.at_method}"


def write_logs(history: List[Dict[str, Any]], out_dir: Path) -> None:
    """Rewrite ``metrics.json`` (list of epoch records) and ``metrics.csv`` (one row per epoch) atomically."""
    atomic_write_text(json.dumps(history, indent=2) + "\n", out_dir / "metrics.json")
    buffer = io.StringIO()
    columns = list(dict.fromkeys(key for record in history for key in record))
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(buffer.getvalue(), out_dir / "metrics.csv")


def clean_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Correct clean predictions in eval mode, without gradients or per-sample hooks (BN stats untouched)."""
    with torch.no_grad(), per_example_hooks_paused(model), attack_mode(model, eval_mode=True):
        return int((model(x).argmax(dim=1) == y).sum())


class _Display:
    """Rich progress bar per epoch and result tables; silent when ``enabled`` is ``False``."""

    def __init__(self, enabled: bool, console: Optional[Console]):
        self.enabled = enabled
        self.console = console or Console()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f}  clean {task.fields[clean]:.1%}  robust {task.fields[robust]:.1%}"),
            TimeElapsedColumn(),
            console=self.console,
            disable=not enabled,
        )

    def print(self, *objects: Any) -> None:
        if self.enabled:
            self.console.print(*objects)


def _epoch_table(history: List[Dict[str, Any]]) -> Table:
    table = Table(title="Epochs")
    for column in ("epoch", "lr", "train loss", "train clean", "train robust", "val clean", "val PGD", "time s"):
        table.add_column(column, justify="right")
    for r in history:
        table.add_row(
            str(r["epoch"]), f"{r['lr']:.4g}", f"{r['train_loss']:.3f}", f"{r['train_clean_acc']:.1%}",
            f"{r['train_robust_acc']:.1%}", f"{r['val_clean_acc']:.1%}", f"{r['val_pgd_acc']:.1%}", f"{r['time_s']:.1f}",
        )
    return table


def _result_table(result: TrainResult) -> Table:
    config = result.config
    table = Table(title=f"{config.optimizer.upper()} + {config.at_method} on {config.dataset} test split (eps {format_eps(config.eps)})")
    table.add_column("model")
    table.add_column("clean acc", justify="right")
    table.add_column(f"PGD-{config.test_pgd_steps} acc", justify="right")
    for label, metrics in ((f"last (epoch {len(result.history)})", result.test_last), (f"best val (epoch {result.best_epoch})", result.test_best)):
        table.add_row(label, f"{metrics['clean_acc']:.2%}", f"{metrics['pgd_acc']:.2%}")
    return table


@dataclass
class _Run:
    """The objects one run trains with; ``trained_model`` is ``model`` or its Opacus wrapper."""

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
    if config.optimizer == "engm":
        engm_options = dict(config.engm_options)
        if config.engm_variant is not None:
            engm_options["variant"] = config.engm_variant
        trained_model, optimizer = make_engm(model, sgd, gamma=config.gamma, grad_sample_mode=config.engm_mode, **engm_options)
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


def _resolve_out_dir(config: TrainConfig, resuming: bool) -> Path:
    """``config.out_dir``, else the resumed checkpoint's folder, else a new timestamped folder; never an existing run unless allowed."""
    if config.out_dir is not None:
        out_dir = Path(config.out_dir)
    elif config.resume is not None:
        out_dir = Path(config.resume).parent
    else:
        out_dir = default_out_dir(config)
    if not resuming and not config.overwrite and ((out_dir / "last.pt").exists() or (out_dir / "best.pt").exists()):
        raise FileExistsError(
            f"{out_dir} already holds a run (last.pt / best.pt). Fix: continue it with resume={str(out_dir / 'last.pt')!r} "
            "(--resume), choose another out_dir, or pass overwrite=True (--overwrite)."
        )
    return out_dir


def _train_epoch(run: _Run, device: torch.device, display: _Display, description: str) -> Dict[str, Any]:
    """One pass over the training loader: AT steps, per-iteration schedule; returns the epoch's train metrics.

    Train clean accuracy is measured before each step on the same weights, in eval mode
    (:func:`clean_correct`). ENGM diagnostics are the means over the epoch's steps of
    ``optimizer.last_step`` fields, when the optimizer has them.
    """
    task = display.progress.add_task(description, total=len(run.train_loader), loss=0.0, clean=0.0, robust=0.0)
    totals = {"loss": 0.0, "clean": 0, "robust": 0, "n": 0}
    diagnostics: Dict[str, List[float]] = {"fraction_above_gamma": [], "median_norm": [], "direction_norm": [], "pearson": []}
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
        stats = getattr(run.optimizer, "last_step", None)
        if stats is not None:
            diagnostics["fraction_above_gamma"].append(stats.fraction_above_gamma)
            diagnostics["median_norm"].append(float(stats.per_example_norms.median()))
            diagnostics["direction_norm"].append(stats.direction_norm)
            if getattr(stats, "pearson", None) is not None:  # cheap variant, on calibration steps
                diagnostics["pearson"].append(stats.pearson)
        n = totals["n"]
        display.progress.update(task, advance=1, loss=totals["loss"] / n, clean=totals["clean"] / n, robust=totals["robust"] / n)
    record: Dict[str, Any] = {
        "lr": lr,
        "train_loss": totals["loss"] / totals["n"],
        "train_clean_acc": totals["clean"] / totals["n"],
        "train_robust_acc": totals["robust"] / totals["n"],
    }
    record.update({f"engm_mean_{name}": float(np.mean(values)) for name, values in diagnostics.items() if values})
    return record


def train(
    config: TrainConfig,
    *,
    on_epoch_end: Optional[Callable[[Dict[str, Any]], None]] = None,
    console: Optional[Console] = None,
) -> TrainResult:
    """Adversarially train a model as ``config`` says; see the module docstring.

    Args:
        config: the run's :class:`TrainConfig`.
        on_epoch_end: called with each epoch's record after its checkpoint is written.
        console: rich console for progress and tables (default: stdout).

    Returns:
        :class:`TrainResult`.

    Raises:
        ValueError: invalid config, or a resume config that differs from the checkpoint's.
        CheckpointError: ``config.resume`` is not a readable engm-opacus checkpoint.
        FileNotFoundError: CIFAR files absent.
        FileExistsError: ``out_dir`` already holds a run and neither ``resume`` nor ``overwrite`` is set.
    """
    config.validate()
    with torch_threads(config.threads):
        return _train(config, on_epoch_end, console)


def _train(
    config: TrainConfig, on_epoch_end: Optional[Callable[[Dict[str, Any]], None]], console: Optional[Console]
) -> TrainResult:
    """:func:`train` after validation, with the thread count set."""
    started = time.perf_counter()
    device = resolve_device(config.device)
    resumed = load_checkpoint(config.resume) if config.resume is not None else None
    if resumed is not None:
        check_resume_compatible(config, resumed["config"], str(config.resume))
    out_dir = _resolve_out_dir(config, resuming=resumed is not None)
    run = _build_run(config, device)

    history: List[Dict[str, Any]] = []
    best_val, best_epoch, start_epoch = -1.0, 0, 0
    if resumed is not None:
        run.model.load_state_dict(resumed["model"])
        run.optimizer.load_state_dict(resumed["optimizer"])
        run.scheduler.load_state_dict(resumed["scheduler"])
        restore_rng_state(resumed["rng"], run.generator)
        history = list(resumed["history"])
        best_val, best_epoch, start_epoch = resumed["best_val_pgd_acc"], resumed["best_epoch"], resumed["epoch"]

    display = _Display(config.progress, console)
    display.print(
        f"Training {config.model} on {config.dataset} with {config.optimizer.upper()}"
        f"{f' (gamma {config.gamma:g})' if config.optimizer == 'engm' else ''} + {config.at_method}, "
        f"eps {format_eps(config.eps)}, {config.epochs} epochs, device {device} -> {out_dir}"
        + (f" (resuming after epoch {start_epoch})" if resumed is not None else "")
    )
    val_options = dict(eps=config.eps, step_size=config.step_size, pgd_steps=config.val_pgd_steps, autoattack=False, device=device)
    with display.progress, warnings.catch_warnings():
        # Opacus's full backward hooks warn on every step that the input needs no gradient (images never do)
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
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
            save_checkpoint(state, out_dir / "last.pt")
            if improved:
                save_checkpoint(state, out_dir / "best.pt")
            write_logs(history, out_dir)
            display.print(
                f"epoch {epoch + 1}/{config.epochs}: train loss {record['train_loss']:.3f}, "
                f"val clean {record['val_clean_acc']:.1%}, val PGD-{config.val_pgd_steps} {record['val_pgd_acc']:.1%}"
            )
            if on_epoch_end is not None:
                on_epoch_end(record)

    test_options = dict(val_options, pgd_steps=config.test_pgd_steps)
    test_last = evaluate(run.model, run.test_loader, **test_options)
    run.model.load_state_dict(load_checkpoint(out_dir / "best.pt", map_location=device)["model"])
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
    atomic_write_text(json.dumps(result.to_json(), indent=2) + "\n", out_dir / "result.json")
    display.print(_epoch_table(history))
    display.print(_result_table(result))
    display.print(
        f"Robust-overfitting gap (best - last val PGD acc): {result.robust_overfitting_gap:.2%}. "
        f"Wall time {result.wall_time_s:.1f} s. Logs and checkpoints in {out_dir}"
    )
    return result
