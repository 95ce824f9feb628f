"""Robustness evaluation: clean, PGD-20 and AutoAttack accuracy under an L-infinity threat model.

:func:`evaluate` measures a model on a loader; :func:`evaluate_checkpoint` rebuilds a trained
model from its checkpoint and measures it on its dataset's test split (``engm-opacus eval``).

AutoAttack ("standard": APGD-CE, APGD-T, FAB-T, Square; Croce & Hein 2020) runs through
``torchattacks.AutoAttack``: the original ``auto-attack`` package is not published on
PyPI, and torchattacks re-implements it. torchattacks 3.5's "standard" keeps its own
defaults (APGD and APGD-T with 10 steps where the original uses 100), so its AutoAttack
accuracy can be somewhat higher than the original package's.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from engm_opacus.at.attacks import attack_mode, pgd_linf, project, validate_threat_model
from engm_opacus.at.step import count_correct
from engm_opacus.training.checkpoints import load_trained_model
from engm_opacus.training.data import limit, load_dataset, make_loader
from engm_opacus.training.runtime import resolve_device, torch_threads

AUTOATTACK_MIN_CLASSES = 4


class CastInput(nn.Module):
    """``model(x.to(dtype)).to(x.dtype)``: torchattacks' FAB works in float32 only, the model may be float64."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``x`` computed in ``self.dtype``, returned in ``x``'s dtype."""
        return self.model(x.to(self.dtype)).to(x.dtype)


def run_autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, n_classes: int, seed: int) -> torch.Tensor:
    """``x_adv`` of ``torchattacks.AutoAttack(version="standard", norm="Linf")``, in ``x``'s dtype.

    torchattacks runs in float32; its result is cast back and projected onto the eps-ball
    around ``x`` and ``[0, 1]`` (removing float32 rounding). Call with the model in eval mode
    and its parameters frozen (as :func:`evaluate` does).
    """
    import torchattacks  # imported on first use: a large import only AutoAttack needs

    target = CastInput(model, x.dtype).eval()
    attack = torchattacks.AutoAttack(target, norm="Linf", eps=eps, version="standard", n_classes=n_classes, seed=seed)
    return project(attack(x.float(), y).detach().to(x.dtype), x, eps)


@contextlib.contextmanager
def parameters_frozen(model: nn.Module) -> Iterator[nn.Module]:
    """``requires_grad=False`` on every parameter inside the block (restored after).

    torchattacks' FAB calls ``backward()``, which would otherwise accumulate into the
    parameters' ``.grad`` and leak into the next training step.
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
) -> Dict[str, Optional[float]]:
    """Accuracy of ``model`` (in eval mode) on clean inputs, PGD and optionally AutoAttack.

    Args:
        model: a plain module or an ENGM-wrapped one, already on ``device``. Its parameters are
            frozen meanwhile, so no backward reaches them: no ``.grad`` and no ENGM records are left.
        loader: yields ``(x, y, ...)`` batches with ``x`` in ``[0, 1]``.
        eps: L-infinity radius in ``[0, 1]``.
        pgd_steps: PGD steps (cross-entropy, uniform random start, step ``step_size``).
        step_size: PGD step.
        autoattack: also run AutoAttack "standard" on the clean-correct examples, as the original
            package does (slow: Square makes up to 5000 queries per still-robust example).
        device: where the batches are moved.
        max_examples: evaluate only the first ``max_examples`` examples of ``loader``.
        seed: seeds PGD's random start and AutoAttack.

    Returns:
        ``{"clean_acc", "pgd_acc", "autoattack_acc", "n_examples"}``; accuracies are fractions
        in ``[0, 1]``; ``autoattack_acc`` is ``None`` when not run.

    Raises:
        ValueError: bad threat model, ``max_examples < 1``, or an empty ``loader``.
    """
    validate_threat_model(eps, step_size, pgd_steps)
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
            if autoattack and logits.shape[1] < AUTOATTACK_MIN_CLASSES:
                raise ValueError(
                    f"AutoAttack needs at least {AUTOATTACK_MIN_CLASSES} classes, got {logits.shape[1]}: "
                    "APGD-T's targeted DLR loss uses the 3rd and 4th largest logits. "
                    "Fix: evaluate with autoattack=False (clean and PGD accuracy only)."
                )
            correct = logits.argmax(dim=1) == y
            clean += int(correct.sum())
            x_pgd = pgd_linf(model, x, y, eps=eps, step_size=step_size, steps=pgd_steps, generator=generator)
            with torch.no_grad():
                robust += count_correct(model(x_pgd), y)
            if autoattack and bool(correct.any()):
                x_auto = run_autoattack(model, x[correct], y[correct], eps=eps, n_classes=logits.shape[1], seed=seed)
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
) -> Dict[str, Any]:
    """Evaluate a checkpoint on its dataset's test split (``threads``: torch CPU threads meanwhile, ``None`` = unchanged).

    The model, dataset and threat model (eps, PGD step) come from the checkpoint's config;
    the arguments given override them.

    Returns:
        ``{"checkpoint", "epoch", "dataset", "model", "optimizer", "at_method", "examples", "eps",
        "step_size", "pgd_steps", "clean_acc", "pgd_acc", "autoattack_acc"}`` (``autoattack_acc``
        is ``None`` when ``autoattack`` is off).

    Raises:
        CheckpointError: unreadable or foreign checkpoint.
        FileNotFoundError: the dataset's files are absent.
        ValueError: eps / step size outside [0, 1], bad ``max_examples``.
    """
    torch_device = resolve_device(device)
    model, config, payload = load_trained_model(checkpoint, torch_device)
    eps = config.eps if eps is None else eps
    step_size = config.step_size if step_size is None else step_size
    splits = load_dataset(config.dataset, config.data_dir if data_dir is None else data_dir)
    test = limit(splits.test, max_examples)
    with torch_threads(threads):
        metrics = evaluate(
            model, make_loader(test, batch_size, shuffle=False), eps=eps, pgd_steps=pgd_steps, step_size=step_size,
            autoattack=autoattack, device=torch_device,
        )
    return {
        "checkpoint": str(checkpoint),
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
    }
