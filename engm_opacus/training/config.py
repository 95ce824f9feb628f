"""``TrainConfig``: everything one training run depends on, validated, and how a checkpoint's config is read back."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from engm_opacus.at.attacks import validate_threat_model
from engm_opacus.at.losses import at_method_names
from engm_opacus.functional import validate_gamma
from engm_opacus.training.amp import AMP_MODES
from engm_opacus.training.data import DATASETS
from engm_opacus.training.models import MODELS, NORMS
from engm_opacus.training.options import check_options
from engm_opacus.training.runtime import DEVICES

OPTIMIZERS: Tuple[str, ...] = ("engm", "engm-input-norm", "msgd")
"""``engm``: exact per-example norms; ``engm-input-norm``: ``make_engm(variant="input-norm")``; ``msgd``: plain momentum SGD."""
VARIANTS: Dict[str, str] = {"engm": "exact", "engm-input-norm": "input-norm"}
"""The ``make_engm`` variant of each ENGM optimizer name."""
OPTIMIZER_LABELS: Dict[str, str] = {"engm": "ENGM", "engm-input-norm": "ENGM (input-norm)", "msgd": "MSGD"}
"""How tables and messages name each optimizer."""
SCHEDULES: Tuple[str, ...] = ("piecewise", "cosine")
DEFAULT_LR: Dict[str, float] = {"engm": 0.5, "engm-input-norm": 0.5, "msgd": 0.1}
"""Base learning rate per optimizer when ``TrainConfig.lr`` is ``None`` (measured on digits, see :class:`TrainConfig`)."""
RESUMABLE_CHANGES: Tuple[str, ...] = ("resume", "out_dir", "device", "threads", "progress", "overwrite")
"""Config fields that may differ between a checkpoint and the run resuming it."""
DATA, ATTACK, OPTIMIZER, RUN = "data and model", "adversarial training", "optimizer", "run"
GROUPS: Tuple[str, ...] = (DATA, ATTACK, OPTIMIZER, RUN)
"""The groups the fields are listed in (``field.metadata["group"]``), e.g. by ``engm-opacus train --help``."""


def _field(default: Any, help_text: str, group: str) -> Any:
    """A dataclass field with its one-line ``help`` and ``group`` in the metadata (a callable default is a factory)."""
    metadata = {"help": help_text, "group": group}
    if callable(default):
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


def field_choices() -> Dict[str, Tuple[str, ...]]:
    """The valid values of each field that takes a name (``dataset``, ``model``, ...)."""
    return {
        "dataset": DATASETS,
        "model": tuple(MODELS),
        "norm": NORMS,
        "at_method": at_method_names(),
        "optimizer": OPTIMIZERS,
        "schedule": SCHEDULES,
        "device": DEVICES,
        "amp": AMP_MODES,
    }


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
    accuracy) ENGM reached 97.8% / 93.1% with ``lr=0.2`` and 98.1% / 93.6% with ``lr=0.5``
    (98.3% / 93.9% with the one-backward core of v0.2: same formulas, other float rounding);
    MSGD 97.8% / 93.6% with ``lr=0.1`` (the reference codebases' value) and 98.3% / 94.2%
    with ``0.05``: on digits at eps 8/255 both optimizers saturate, within a few test images.

    Attributes:
        dataset: ``digits`` | ``cifar10`` | ``cifar100``.
        data_dir: folder with the dataset files (CIFAR, TinyImageNet; not used by digits).
        model: a name registered in :data:`engm_opacus.training.models.MODELS`
            (``small-cnn`` | ``preact-resnet18`` | ``wrn-34-10``).
        norm: ``group`` | ``batch`` (see :mod:`engm_opacus.training.models`).
        width: model width override (``None``: the standard width).
        at_method: an AT loss name of :func:`engm_opacus.at.losses.get_at_loss`.
        at_options: extra keyword arguments of the AT loss: ``beta`` (TRADES), ``lam`` (MART),
            ``gamma_awp`` (AWP); the list is :func:`engm_opacus.training.options.at_loss_options`.
        attack_eval_mode: attack with the model in eval mode during training.
        optimizer: ``engm`` (exact per-example norms), ``engm-input-norm`` (the input-norm
            variant) or ``msgd`` (plain momentum SGD on the mean loss, the baseline).
        gamma: ENGM normalization floor in ``w_i = 1/max(||g_i||, gamma)``.
        engm_options: further keyword arguments of :func:`engm_opacus.make_engm`
            (``on_nonfinite``; input-norm only: ``input_norm_scale``, ``calibrate_every``,
            ``calibration_momentum``): :func:`engm_opacus.training.options.engm_options`.
        lr: base learning rate; ``None`` resolves (in :meth:`validate`) to :data:`DEFAULT_LR` of
            the optimizer: the update sizes of ENGM and MSGD differ (ENGM's direction has norm
            at most ``1/gamma``-scaled per example), so each gets its own default.
        momentum, weight_decay, nesterov: ``torch.optim.SGD`` hyper-parameters.
        schedule: ``piecewise`` (factor 1, 0.1, 0.01 from 0%, 50%, 75% of the epochs: 100/150 of 200)
            or ``cosine`` (``0.5 (1 + cos(pi t / T))``); both stepped every iteration.
        epochs, batch_size, seed: the usual; ``seed`` seeds init, data order and attacks.
            Under ``torchrun`` ``batch_size`` is the global batch (``batch_size / N`` per process,
            see :mod:`engm_opacus.training.distributed`).
        device: ``auto`` (CUDA if available) | ``cpu`` | ``cuda`` (under ``torchrun``: ``LOCAL_RANK``'s GPU).
        amp: mixed precision of the training step: ``off``, ``bf16`` (``torch.autocast``) or
            ``fp16`` (``torch.autocast`` and a ``torch.amp.GradScaler``): :mod:`engm_opacus.training.amp`.
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
        out_dir: run folder (``None``: a new ``runs/<UTC time>-<dataset>-<optimizer>-<at_method>``,
            with ``-2``, ``-3``, ... appended if that exists, or the checkpoint's folder when resuming).
        resume: a checkpoint to continue from.
        overwrite: allow starting a fresh run in an ``out_dir`` that already has checkpoints.
        progress: show rich progress bars, per-epoch lines and the result tables (``engm-opacus
            train --no-progress`` still prints the tables).
    """

    dataset: str = _field("digits", "dataset", DATA)
    data_dir: Optional[str] = _field(None, "folder with the dataset files (CIFAR, TinyImageNet; not used by digits)", DATA)
    model: str = _field("small-cnn", "architecture", DATA)
    norm: str = _field("group", "normalization layers", DATA)
    width: Optional[int] = _field(None, "model width / widen factor override (none: the model's standard width)", DATA)
    at_method: str = _field("pgd-at", "AT loss", ATTACK)
    at_options: Dict[str, Any] = _field(dict, "keyword options of the AT loss (one flag each below)", ATTACK)
    attack_eval_mode: bool = _field(False, "attack with the model in eval mode during training", ATTACK)
    optimizer: str = _field(
        "engm", "outer optimizer: engm (exact per-example norms), engm-input-norm (norms estimated from input "
        "gradients), or msgd for the plain momentum-SGD baseline", OPTIMIZER,
    )
    gamma: float = _field(1.0, "ENGM normalization floor in w_i = 1/max(||g_i||, gamma)", OPTIMIZER)
    engm_options: Dict[str, Any] = _field(dict, "keyword options of make_engm (one flag each below)", OPTIMIZER)
    lr: Optional[float] = _field(None, "base learning rate (none: 0.5 for ENGM, 0.1 for MSGD)", OPTIMIZER)
    momentum: float = _field(0.9, "SGD momentum", OPTIMIZER)
    weight_decay: float = _field(5e-4, "SGD weight decay", OPTIMIZER)
    nesterov: bool = _field(False, "Nesterov momentum", OPTIMIZER)
    schedule: str = _field("piecewise", "LR schedule (piecewise: /10 at 50% and 75% of the epochs)", OPTIMIZER)
    epochs: int = _field(10, "training epochs", OPTIMIZER)
    batch_size: int = _field(32, "mini-batch size (under torchrun: the global batch, split evenly over the processes)", OPTIMIZER)
    seed: int = _field(0, "seed of initialization, data order and attacks", RUN)
    device: str = _field("auto", "device (under torchrun, cuda is LOCAL_RANK's GPU)", RUN)
    amp: str = _field("off", "mixed precision of the training step: bf16 (autocast) or fp16 (autocast and a GradScaler)", RUN)
    threads: Optional[int] = _field(1, "CPU threads for torch (none: torch's setting; 1 is fastest for the small default model)", RUN)
    eps: float = _field(8 / 255, "L-infinity radius in [0, 1]; fractions such as 8/255 are accepted", ATTACK)
    step_size: float = _field(2 / 255, "PGD step in [0, 1]", ATTACK)
    pgd_steps: int = _field(10, "PGD steps of the training attack", ATTACK)
    val_pgd_steps: int = _field(10, "PGD steps of the per-epoch validation attack", ATTACK)
    test_pgd_steps: int = _field(20, "PGD steps of the final test evaluation", ATTACK)
    max_train_examples: Optional[int] = _field(None, "train on the first N training examples only (none: all)", DATA)
    max_val_examples: Optional[int] = _field(None, "validate on the first N validation examples only (none: all)", DATA)
    max_test_examples: Optional[int] = _field(None, "test on the first N test examples only (none: all)", DATA)
    out_dir: Optional[str] = _field(None, "run folder (default: a new runs/<UTC time>-<dataset>-<optimizer>-<at-method>[-N])", RUN)
    resume: Optional[str] = _field(None, "continue the run of this checkpoint (its config is the base)", RUN)
    overwrite: bool = _field(False, "allow a fresh run in an out-dir that already has checkpoints", RUN)
    progress: bool = _field(True, "progress bars and per-epoch lines (the result tables are printed either way)", RUN)

    @property
    def uses_engm(self) -> bool:
        """Whether the run trains with an ENGM optimizer (exact or input-norm)."""
        return self.optimizer in VARIANTS

    def validate(self) -> "TrainConfig":
        """Raise ``ValueError`` naming the valid choices for any bad field; resolve ``lr=None``; return ``self``."""
        for name, valid in field_choices().items():
            value = getattr(self, name)
            if value not in valid:
                raise ValueError(f"Unknown {name} {value!r}. Fix: use one of {', '.join(valid)}.")
        for steps in (self.pgd_steps, self.val_pgd_steps, self.test_pgd_steps):
            validate_threat_model(self.eps, self.step_size, steps)
        if self.uses_engm:
            validate_gamma(self.gamma)
        check_options("at_options", self.at_options, self.at_method, "at_method")
        if self.engm_options and not self.uses_engm:
            raise ValueError(f"engm_options {self.engm_options!r} need an ENGM optimizer, not {self.optimizer!r}. Fix: drop them.")
        check_options("engm_options", self.engm_options, self.optimizer, "optimizer")
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


def config_from_payload(payload: Dict[str, Any]) -> TrainConfig:
    """The :class:`TrainConfig` stored in a loaded checkpoint (fields this version does not know are dropped)."""
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{key: value for key, value in payload["config"].items() if key in known})


def check_resume_compatible(config: TrainConfig, saved: Dict[str, Any], path: str) -> None:
    """Raise ``ValueError`` if ``config`` differs from the checkpoint's config outside :data:`RESUMABLE_CHANGES`."""
    current = asdict(config)
    defaults = asdict(TrainConfig())  # a field newer than the checkpoint was trained with its default
    recorded = {name: saved.get(name, defaults[name]) for name in current}
    differences = [
        f"{name}: checkpoint {recorded[name]!r}, now {current[name]!r}"
        for name in current
        if name not in RESUMABLE_CHANGES and recorded[name] != current[name]
    ]
    if differences:
        raise ValueError(
            f"Cannot resume from {path}: the config differs from the one it was trained with ({'; '.join(differences)}). "
            "Fix: resume with the checkpoint's settings (the CLI takes them from the checkpoint when you only pass "
            "--resume), or start a new run."
        )


def default_out_dir(config: TrainConfig) -> Path:
    """``runs/<UTC time>-<dataset>-<optimizer>-<at_method>``: the base name; the loop claims it (or ``-2``, ``-3``, ...).

    :func:`engm_opacus.training.logs.claim_new_dir` makes the folder exclusively, so runs started
    in the same second get distinct folders.
    """
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{config.dataset}-{config.optimizer}-{config.at_method}"


def format_eps(eps: float) -> str:
    """``8/255`` when ``eps`` is a whole number of 1/255 steps, else ``eps`` to 4 digits."""
    steps = eps * 255
    return f"{round(steps)}/255" if abs(steps - round(steps)) < 1e-9 else f"{eps:.4g}"
