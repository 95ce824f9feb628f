"""Robustness evaluation: clean, PGD-20 and AutoAttack accuracy under an L-infinity threat model.

:func:`evaluate` measures a model on a loader; :func:`evaluate_checkpoint` rebuilds a trained
model from its checkpoint and measures it on its dataset's test split (``engm-opacus eval``).

AutoAttack (Croce & Hein, ICML 2020) is the original implementation, packaged on PyPI as
``pyautoattack`` (the ``[eval]`` extra: ``pip install 'engm-opacus[eval]'``), imported on first
use. Version ``"standard"`` runs APGD-CE, APGD-T, FAB-T and Square with the published settings
(100 iterations, 9 target classes, 5000 Square queries); ``"plus"``, ``"rand"`` and ``"custom"``
(a list of attacks) are the package's other versions.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterable, Iterator, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from engm_opacus.at.attacks import attack_mode, pgd_linf, project, validate_threat_model
from engm_opacus.at.step import count_correct
from engm_opacus.training.checkpoints import load_trained_model
from engm_opacus.training.data import limit, load_dataset, make_loader
from engm_opacus.training.extras import require
from engm_opacus.training.logs import sha256_of
from engm_opacus.training.runtime import resolve_device, torch_threads

AUTOATTACK_VERSIONS = ("standard", "plus", "rand", "custom")
"""``version`` of ``pyautoattack.AutoAttack``; ``"custom"`` runs the ``attacks`` given."""
AUTOATTACK_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
"""The attacks a ``"custom"`` AutoAttack can run."""
VERSION_ATTACKS: Dict[str, Tuple[str, ...]] = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
}
"""The attacks each fixed version runs, in order (``pyautoattack.AutoAttack._set_version``)."""
DLR_ATTACKS = ("apgd-dlr", "apgd-t")
"""Attacks on the DLR loss, which uses the 3rd and 4th largest logits."""
AUTOATTACK_MIN_CLASSES = 4
MAX_TARGET_CLASSES = 9


class CastInput(nn.Module):
    """``model(x.to(dtype)).to(x.dtype)``: AutoAttack works in float32, the model may be float64."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``x`` computed in ``self.dtype``, returned in ``x``'s dtype."""
        return self.model(x.to(self.dtype)).to(x.dtype)


def autoattack_plan(version: str = "standard", attacks: Optional[Sequence[str]] = None) -> Tuple[str, ...]:
    """The attacks AutoAttack ``version`` runs (``attacks`` for ``"custom"``), after checking the pair.

    Raises:
        ValueError: unknown version or attack, ``attacks`` with a fixed version, or none with ``"custom"``.
    """
    if version not in AUTOATTACK_VERSIONS:
        raise ValueError(
            f"AutoAttack version must be one of {', '.join(AUTOATTACK_VERSIONS)}, got {version!r}. Fix: e.g. version='standard'."
        )
    if version != "custom":
        if attacks:
            raise ValueError(
                f"AutoAttack attacks are chosen by version {version!r}; got attacks={list(attacks)!r}. "
                "Fix: pass version='custom' with the attacks, or no attacks."
            )
        return VERSION_ATTACKS[version]
    unknown = [a for a in attacks or () if a not in AUTOATTACK_ATTACKS]
    if not attacks or unknown:
        raise ValueError(
            f"AutoAttack version 'custom' needs attacks from {', '.join(AUTOATTACK_ATTACKS)}; got {list(attacks or ())!r}. "
            "Fix: e.g. attacks=['apgd-ce', 'square']."
        )
    return tuple(attacks)


def check_classes(n_classes: int, plan: Sequence[str]) -> None:
    """Raise ``ValueError`` when an attack of ``plan`` uses the DLR loss and there are fewer than 4 classes."""
    if n_classes < AUTOATTACK_MIN_CLASSES and any(a in DLR_ATTACKS for a in plan):
        raise ValueError(
            f"AutoAttack needs at least {AUTOATTACK_MIN_CLASSES} classes, got {n_classes}: "
            "APGD-T's targeted DLR loss uses the 3rd and 4th largest logits. "
            "Fix: evaluate with autoattack=False (clean and PGD accuracy only), or version='custom' without apgd-dlr / apgd-t."
        )


def make_autoattack(
    model: nn.Module, *, eps: float, n_classes: int, version: str = "standard", attacks: Optional[Sequence[str]] = None,
    seed: int = 0, device: Union[str, torch.device] = "cpu",
) -> Any:
    """A ``pyautoattack.AutoAttack`` (L-infinity) with its version's settings; targets capped at ``n_classes - 1``.

    The published settings target the 9 runner-up classes of CIFAR-10; with fewer classes the
    targeted attacks take every other class (``n_classes - 1``), as the original README advises.

    Raises:
        MissingExtraError: ``pyautoattack`` is not installed (``pip install 'engm-opacus[eval]'``).
        ValueError: see :func:`autoattack_plan`; fewer than 4 classes with an attack on the DLR loss.
    """
    plan = autoattack_plan(version, attacks)
    check_classes(n_classes, plan)
    pyautoattack = require("pyautoattack", "AutoAttack")
    adversary = pyautoattack.AutoAttack(
        model, norm="Linf", eps=float(eps), version=version, attacks=list(plan) if version == "custom" else None,
        seed=seed, device=device,
    )
    targets = min(MAX_TARGET_CLASSES, n_classes - 1)
    adversary.apgd_targeted.n_target_classes = min(adversary.apgd_targeted.n_target_classes, targets)
    adversary.fab.n_target_classes = min(adversary.fab.n_target_classes, targets)
    return adversary


def autoattack_settings(adversary: Any) -> Dict[str, Any]:
    """What an AutoAttack run used, read off the adversary (recorded next to its accuracy)."""
    import pyautoattack

    return {
        "package": f"pyautoattack {pyautoattack.__version__}",
        "version": adversary.version,
        "attacks": list(adversary.attacks_to_run),
        "norm": adversary.norm,
        "eps": adversary.epsilon,
        "apgd_iterations": adversary.apgd.n_iter,
        "apgd_restarts": adversary.apgd.n_restarts,
        "apgd_t_iterations": adversary.apgd_targeted.n_iter,
        "apgd_t_target_classes": adversary.apgd_targeted.n_target_classes,
        "fab_iterations": adversary.fab.n_iter,
        "fab_target_classes": adversary.fab.n_target_classes,
        "square_queries": adversary.square.n_queries,
        "eot_iterations": adversary.apgd.eot_iter,
        "seed": adversary.seed,
    }


def run_autoattack(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, n_classes: int, seed: int,
    version: str = "standard", attacks: Optional[Sequence[str]] = None,
) -> torch.Tensor:
    """``x_adv`` of ``pyautoattack.AutoAttack(norm="Linf", version=version)``, in ``x``'s dtype.

    AutoAttack runs in float32; its result is cast back and projected onto the eps-ball around
    ``x`` and ``[0, 1]`` (removing float32 rounding). Call with the model in eval mode and its
    parameters frozen (as :func:`evaluate` does).
    """
    target = CastInput(model, x.dtype).eval()
    adversary = make_autoattack(target, eps=eps, n_classes=n_classes, version=version, attacks=attacks, seed=seed, device=x.device)
    x_adv, _ = adversary.run_standard_evaluation(x.float(), y, batch_size=max(len(x), 1))
    return project(x_adv.detach().to(x.dtype), x, eps)


@contextlib.contextmanager
def parameters_frozen(model: nn.Module) -> Iterator[nn.Module]:
    """``requires_grad=False`` on every parameter inside the block (restored after).

    AutoAttack's gradient attacks differentiate through the model; with the parameters frozen
    nothing accumulates into their ``.grad`` (or an ENGM model's records) to leak into the next
    training step.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, requires_grad in flags:
            p.requires_grad_(requires_grad)


def evaluate(
    model: nn.Module,
    loader: Iterable[Sequence[torch.Tensor]],
    *,
    eps: float = 8 / 255,
    pgd_steps: int = 20,
    step_size: float = 2 / 255,
    autoattack: bool = False,
    device: Union[str, torch.device] = "cpu",
    max_examples: Optional[int] = None,
    seed: int = 0,
    autoattack_version: str = "standard",
    autoattack_attacks: Optional[Sequence[str]] = None,
) -> Dict[str, Optional[float]]:
    """Accuracy of ``model`` (in eval mode) on clean inputs, PGD and optionally AutoAttack.

    Args:
        model: a plain module or an ENGM-wrapped one, already on ``device``. Its parameters are
            frozen meanwhile, so no backward reaches them: no ``.grad`` and no ENGM records are left.
        loader: yields ``(x, y, ...)`` batches with ``x`` in ``[0, 1]``.
        eps: L-infinity radius in ``[0, 1]``.
        pgd_steps: PGD steps (cross-entropy, uniform random start, step ``step_size``).
        step_size: PGD step.
        autoattack: also run AutoAttack (``pyautoattack``, the ``[eval]`` extra) on the clean-correct
            examples, as the original package does (slow: Square makes up to 5000 queries per
            still-robust example).
        device: where the batches are moved.
        max_examples: evaluate only the first ``max_examples`` examples of ``loader``.
        seed: seeds PGD's random start and AutoAttack.
        autoattack_version: ``"standard"`` (APGD-CE, APGD-T, FAB-T, Square; 100 iterations),
            ``"plus"``, ``"rand"`` (for randomized defenses) or ``"custom"``.
        autoattack_attacks: the attacks of a ``"custom"`` version, e.g. ``["apgd-ce", "square"]``.

    Returns:
        ``{"clean_acc", "pgd_acc", "autoattack_acc", "n_examples"}``; accuracies are fractions
        in ``[0, 1]``; ``autoattack_acc`` is ``None`` when not run.

    Raises:
        ValueError: bad threat model or AutoAttack version, ``max_examples < 1``, or an empty ``loader``.
        MissingExtraError: ``autoattack=True`` without ``pyautoattack`` (``pip install 'engm-opacus[eval]'``).
    """
    validate_threat_model(eps, step_size, pgd_steps)
    plan: Tuple[str, ...] = ()
    if autoattack:
        plan = autoattack_plan(autoattack_version, autoattack_attacks)
        require("pyautoattack", "AutoAttack")  # before the PGD work, not after it
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1):
        raise ValueError(f"max_examples must be a positive int or None, got {max_examples!r}.")
    generator = torch.Generator().manual_seed(seed)
    clean = robust = auto = total = 0
    with attack_mode(model, eval_mode=True), parameters_frozen(model):
        for batch in loader:
            x, y = batch[0].to(device), batch[1].to(device)
            if max_examples is not None:
                x, y = x[: max_examples - total], y[: max_examples - total]
            if len(y) == 0:
                break
            with torch.no_grad():
                logits = model(x)
            if autoattack:
                check_classes(logits.shape[1], plan)
            correct = logits.argmax(dim=1) == y
            clean += int(correct.sum())
            x_pgd = pgd_linf(model, x, y, eps=eps, step_size=step_size, steps=pgd_steps, generator=generator)
            with torch.no_grad():
                robust += count_correct(model(x_pgd), y)
            if autoattack and bool(correct.any()):
                x_auto = run_autoattack(
                    model, x[correct], y[correct], eps=eps, n_classes=logits.shape[1], seed=seed,
                    version=autoattack_version, attacks=autoattack_attacks,
                )
                with torch.no_grad():
                    auto += count_correct(model(x_auto), y[correct])
            total += len(y)
    if total == 0:
        raise ValueError("evaluate got no examples. Fix: pass a loader with at least one non-empty batch.")
    return {
        "clean_acc": clean / total,
        "pgd_acc": robust / total,
        "autoattack_acc": auto / total if autoattack else None,
        "n_examples": total,
    }


def evaluate_checkpoint(
    checkpoint: str,
    *,
    autoattack: bool = True,
    max_examples: Optional[int] = None,
    pgd_steps: int = 20,
    eps: Optional[float] = None,
    step_size: Optional[float] = None,
    batch_size: int = 256,
    device: str = "auto",
    data_dir: Optional[str] = None,
    threads: Optional[int] = 1,
    autoattack_version: str = "standard",
    autoattack_attacks: Optional[Sequence[str]] = None,
    seed: int = 0,
) -> Dict[str, Any]:
    """Evaluate a checkpoint on its dataset's test split (``threads``: torch CPU threads meanwhile, ``None`` = unchanged).

    The model, dataset and threat model (eps, PGD step) come from the checkpoint's config;
    the arguments given override them. ``autoattack_version`` / ``autoattack_attacks`` / ``seed``
    are :func:`evaluate`'s.

    Returns:
        ``{"checkpoint", "checkpoint_sha256", "epoch", "dataset", "model", "optimizer", "at_method",
        "examples", "eps", "step_size", "pgd_steps", "clean_acc", "pgd_acc", "autoattack_acc"}``
        (``autoattack_acc`` is ``None`` when ``autoattack`` is off), and with AutoAttack its
        settings as ``autoattack_<name>`` keys (``autoattack_version``, ``autoattack_attacks``,
        ``autoattack_apgd_iterations``, ...: :func:`autoattack_settings` without ``eps``).

    Raises:
        CheckpointError: unreadable or foreign checkpoint.
        FileNotFoundError: the dataset's files are absent.
        ValueError: eps / step size outside [0, 1], bad ``max_examples`` or AutoAttack version.
        MissingExtraError: ``autoattack`` without ``pyautoattack`` (``pip install 'engm-opacus[eval]'``).
    """
    if autoattack:
        autoattack_plan(autoattack_version, autoattack_attacks)
        require("pyautoattack", "AutoAttack")  # before loading anything
    torch_device = resolve_device(device)
    model, config, payload = load_trained_model(checkpoint, torch_device)
    eps = config.eps if eps is None else eps
    step_size = config.step_size if step_size is None else step_size
    splits = load_dataset(config.dataset, config.data_dir if data_dir is None else data_dir)
    test = limit(splits.test, max_examples)
    with torch_threads(threads):
        metrics = evaluate(
            model, make_loader(test, batch_size, shuffle=False), eps=eps, pgd_steps=pgd_steps, step_size=step_size,
            autoattack=autoattack, device=torch_device, seed=seed, autoattack_version=autoattack_version,
            autoattack_attacks=autoattack_attacks,
        )
    settings: Dict[str, Any] = {}
    if autoattack:
        adversary = make_autoattack(
            nn.Identity(), eps=eps, n_classes=splits.num_classes, version=autoattack_version, attacks=autoattack_attacks, seed=seed,
        )
        settings = {f"autoattack_{k}": v for k, v in autoattack_settings(adversary).items() if k != "eps"}
    return {
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha256_of(checkpoint),
        "epoch": payload["epoch"],
        "dataset": config.dataset,
        "model": config.model,
        "optimizer": config.optimizer,
        "at_method": config.at_method,
        "examples": len(test),
        "eps": eps,
        "step_size": step_size,
        "pgd_steps": pgd_steps,
        "clean_acc": metrics["clean_acc"],
        "pgd_acc": metrics["pgd_acc"],
        "autoattack_acc": metrics.get("autoattack_acc"),
        **settings,
    }
