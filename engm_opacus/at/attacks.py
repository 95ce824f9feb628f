"""L-infinity PGD for adversarial training and evaluation (inputs in ``[0, 1]``).

One iterate of projected gradient ascent (Madry et al. 2018):

.. math::

    x^{(t+1)} = \\Pi_{[0,1]}\\big(\\Pi_{B_\\infty(x, \\epsilon)}\\big(x^{(t)} + \\alpha\\,
    \\mathrm{sign}(\\nabla_{x^{(t)}} \\textstyle\\sum_i L_i(x^{(t)}))\\big)\\big)

with the attack loss ``L_i`` either cross-entropy (``loss="ce"``: PGD-AT, MART,
evaluation) or ``KL(p(x_i) || p(x_adv_i))`` summed over classes (``loss="kl"``:
TRADES, whose attack maximizes its robust term).

The attack never writes per-sample gradients or ``.grad`` into the model: it takes
``torch.autograd.grad`` w.r.t. the input only, and Opacus's per-sample hooks are
paused while it runs (:func:`per_example_hooks_paused`).

Model mode: :func:`pgd_linf` keeps the model's current mode (train mode during
training, as the Madry and Rice et al. codebases attack). Use
:func:`attack_mode` (``eval_mode=True``) to attack in eval mode, as Zhang et al.'s
TRADES and Wang et al.'s MART reference code do; the AT loss adapters expose this
as ``attack_eval_mode`` (default ``False``).
"""

from __future__ import annotations

import contextlib
import numbers
from typing import Iterator, Literal, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from opacus.grad_sample import AbstractGradSampleModule, GradSampleModuleExpandedWeights
from torch import nn

AttackLoss = Literal["ce", "kl"]
RandomStart = Union[bool, Literal["uniform", "normal"]]
ATTACK_LOSSES: Tuple[str, ...] = ("ce", "kl")
NORMAL_START_STD = 0.001
"""Standard deviation of the ``"normal"`` start, ``x + 0.001 * N(0, 1)`` (TRADES and MART reference code)."""


def validate_threat_model(eps: float, step_size: float, steps: int) -> None:
    """Raise ``ValueError`` unless ``0 <= eps <= 1``, ``0 <= step_size <= 1`` and ``steps`` is an int ``>= 0``."""
    for name, value in (("eps", eps), ("step_size", step_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(
                f"{name} must be a number in [0, 1] (inputs live in [0, 1]), got {value!r}. "
                f"Fix: give {name} on the [0, 1] pixel scale, e.g. {name}=8/255 rather than 8."
            )
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}. Fix: e.g. steps=10 for training, 20 for evaluation.")


def require_unit_range(x: torch.Tensor) -> None:
    """Raise ``ValueError`` if ``x`` has entries outside ``[0, 1]``."""
    if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
        raise ValueError(
            f"Attack inputs must lie in [0, 1], got range [{float(x.min()):.4g}, {float(x.max()):.4g}]. "
            "Fix: feed unnormalized images and put the mean/std normalization inside the model "
            "(e.g. as its first layer), so that eps is measured in pixel units."
        )


@contextlib.contextmanager
def per_example_hooks_paused(model: nn.Module) -> Iterator[nn.Module]:
    """Turn off Opacus's per-sample-gradient hooks inside ``model``; restore their previous state on exit.

    Works for every Opacus ``GradSampleModule`` (hooks or functorch mode, and
    subclasses such as ``GradSampleModuleFastGradientClipping``) found in
    ``model.modules()``; a plain ``nn.Module`` passes through unchanged. Inside the
    block, forwards record no activations and backwards write no ``grad_sample``, so
    attacks and auxiliary gradients leave no per-sample state behind.

    Raises:
        TypeError: for ``GradSampleModuleExpandedWeights``, which computes per-sample
            gradients in its forward and has no hooks to pause.
    """
    hooked = []
    for module in model.modules():
        if isinstance(module, GradSampleModuleExpandedWeights):
            raise TypeError(
                "Cannot pause per-sample gradients of a GradSampleModuleExpandedWeights (it has no hooks). "
                "Fix: wrap the model with grad_sample_mode='hooks' or 'functorch' (make_engm's modes)."
            )
        if isinstance(module, AbstractGradSampleModule) and hasattr(module, "hooks_enabled"):
            hooked.append((module, module.hooks_enabled))
    for module, _ in hooked:
        module.disable_hooks()
    try:
        yield model
    finally:
        for module, was_enabled in hooked:
            module.hooks_enabled = was_enabled


@contextlib.contextmanager
def attack_mode(model: nn.Module, eval_mode: bool) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode inside the block when ``eval_mode``; restore every submodule's flag after.

    With ``eval_mode=False`` the model's modes are left as they are.
    """
    if not eval_mode:
        yield model
        return
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


def attack_loss_per_example(
    logits: torch.Tensor, y: torch.Tensor, loss: AttackLoss, clean_probs: Optional[torch.Tensor]
) -> torch.Tensor:
    """``[B]`` attack objective: ``CE(logits_i, y_i)`` or ``sum_k p_k(x_i) (log p_k(x_i) - log p_k(x_adv_i))``."""
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    return F.kl_div(F.log_softmax(logits, dim=1), clean_probs, reduction="none").sum(dim=1)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Project onto the L-infinity ball ``||x_adv - x||_inf <= eps``, then onto ``[0, 1]``."""
    return torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0.0, 1.0)


def random_start_point(
    x: torch.Tensor, eps: float, kind: Literal["uniform", "normal"], generator: Optional[torch.Generator]
) -> torch.Tensor:
    """The first iterate.

    ``"uniform"`` (Madry et al., Rice et al.): ``clamp(x + U(-eps, eps), 0, 1)``.
    ``"normal"`` (Zhang et al.'s TRADES, Wang et al.'s MART code): ``x + 0.001 * N(0, 1)``,
    not clamped, exactly as their code evaluates its first gradient there.
    The noise is drawn on ``generator``'s device (so a CPU generator gives the same start
    for inputs on any device), on ``x``'s device from the global RNG when ``generator`` is ``None``.
    """
    device = x.device if generator is None else generator.device
    draw = torch.rand if kind == "uniform" else torch.randn
    noise = draw(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)
    if kind == "uniform":
        return torch.clamp(x + (2.0 * noise - 1.0) * eps, 0.0, 1.0)
    return x + NORMAL_START_STD * noise


def resolve_start(random_start: RandomStart, loss: AttackLoss) -> Optional[Literal["uniform", "normal"]]:
    """``True`` means ``"uniform"`` for ``"ce"`` and ``"normal"`` for ``"kl"``; ``False`` means start at ``x``."""
    if random_start is True:
        return "uniform" if loss == "ce" else "normal"
    if random_start is False:
        return None
    if random_start in ("uniform", "normal"):
        return random_start
    raise ValueError(
        f"random_start must be True, False, 'uniform' or 'normal', got {random_start!r}. "
        "Fix: use True (the convention of the attack loss) unless you reproduce a specific codebase."
    )


def pgd_linf(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss: AttackLoss = "ce",
    eps: float = 8 / 255,
    step_size: float = 2 / 255,
    steps: int = 10,
    random_start: RandomStart = True,
    clean_logits: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    return_input_grad: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """L-infinity PGD: ``steps`` signed-gradient ascent steps of size ``step_size``, projected to the eps-ball and ``[0, 1]``.

    Args:
        model: the network (a plain module or an Opacus ``GradSampleModule``); its mode is kept.
        x: ``[B, ...]`` clean inputs in ``[0, 1]``.
        y: ``[B]`` labels (used by ``loss="ce"``).
        loss: ``"ce"`` maximizes cross-entropy; ``"kl"`` maximizes ``KL(p(x) || p(x_adv))``.
        eps: L-infinity radius in ``[0, 1]``.
        step_size: step ``alpha`` in ``[0, 1]``.
        steps: number of steps (``0`` returns the projected start).
        random_start: ``True``: uniform in the eps-ball for ``"ce"``, ``x + 0.001 N(0,1)`` for ``"kl"``
            (at ``x_adv = x`` the KL gradient is zero); ``"uniform"``/``"normal"`` force one; ``False``: start at ``x``.
        clean_logits: logits of ``x`` for the KL target (detached); computed here, in the model's
            current mode, when ``None``.
        generator: RNG for the random start (the global RNG when ``None``).
        return_input_grad: also return the input gradient of the last step.

    Returns:
        ``x_adv`` (detached), or ``(x_adv, input_grad)`` where ``input_grad`` is
        ``grad_{x'} sum_i L_i(x'_i)`` at ``x' = x^{(steps-1)}``, the iterate *before* the
        last sign step (the gradient whose sign made that step), i.e. row ``i`` is the
        gradient of example ``i``'s own attack loss; ``None`` when ``steps == 0``.

    Raises:
        ValueError: ``eps``/``step_size`` outside ``[0, 1]``, bad ``steps``/``loss``/``random_start``,
            or inputs outside ``[0, 1]``.
    """
    validate_threat_model(eps, step_size, steps)
    if loss not in ATTACK_LOSSES:
        raise ValueError(f"Unknown attack loss {loss!r}. Fix: use one of {', '.join(ATTACK_LOSSES)}.")
    start = resolve_start(random_start, loss)
    x = x.detach()
    require_unit_range(x)
    input_grad: Optional[torch.Tensor] = None
    with per_example_hooks_paused(model):
        clean_probs = None
        if loss == "kl":
            if clean_logits is None:
                with torch.no_grad():
                    clean_logits = model(x)
            clean_probs = F.softmax(clean_logits.detach(), dim=1)
        x_adv = x.clone() if start is None else random_start_point(x, eps, start, generator)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                objective = attack_loss_per_example(model(x_adv), y, loss, clean_probs).sum()
            (input_grad,) = torch.autograd.grad(objective, x_adv)
            x_adv = project(x_adv.detach() + step_size * torch.sign(input_grad), x, eps)
        x_adv = project(x_adv.detach(), x, eps)
    if return_input_grad:
        return x_adv, input_grad
    return x_adv
