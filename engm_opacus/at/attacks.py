"""L-infinity PGD (``pgd_linf``) for adversarial training and evaluation, inputs in ``[0, 1]``.

One iterate of projected gradient ascent (Madry et al. 2018):

.. math::

    x^{(t+1)} = \\Pi_{[0,1]}\\big(\\Pi_{B_\\infty(x, \\epsilon)}\\big(x^{(t)} + \\alpha\\,
    \\mathrm{sign}(\\nabla_{x^{(t)}} \\textstyle\\sum_i L_i(x^{(t)}))\\big)\\big)

with the attack objective ``L_i`` either cross-entropy (``loss="ce"``: PGD-AT, MART,
evaluation) or ``KL(p(x_i) || p(x_adv_i))`` summed over classes (``loss="kl"``:
TRADES, whose attack maximizes its robust term).

The attack differentiates w.r.t. the input only (``torch.autograd.grad``), so it never
writes ``.grad`` into the model, and an ENGM-wrapped model records nothing for it (a
backward pass that does not reach the parameters is not recorded). It works on any
``nn.Module``, wrapped or not.

Model mode: :func:`pgd_linf` keeps the model's current mode (train mode during
training, as the Madry and Rice et al. codebases attack). Use :func:`attack_mode`
(``eval_mode=True``) to attack in eval mode, as Zhang et al.'s TRADES and Wang et al.'s
MART reference code do; the AT loss adapters expose this as ``attack_eval_mode``.

Arguments are checked once per call, before the loop, by :func:`validate_attack`
(one device synchronization, for the ``[0, 1]`` range of ``x``); the loop itself never
synchronizes.
"""

from __future__ import annotations

import contextlib
import numbers
from typing import Iterator, Literal, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

AttackLoss = Literal["ce", "kl"]
StartKind = Literal["uniform", "normal"]
RandomStart = Union[bool, StartKind]
ATTACK_LOSSES: Tuple[str, ...] = ("ce", "kl")
NORMAL_START_STD = 0.001
"""Standard deviation of the ``"normal"`` start, ``x + 0.001 * N(0, 1)`` (TRADES and MART reference code)."""


def validate_threat_model(eps: float, step_size: float, steps: int) -> None:
    """Check the threat model's scalars (no tensors, no device synchronization).

    Args:
        eps: L-infinity radius; must be a real number in ``[0, 1]`` (pixel scale).
        step_size: PGD step ``alpha``; a real number in ``[0, 1]``.
        steps: number of PGD steps; an integer ``>= 0``.

    Raises:
        ValueError: naming the argument and the fix.
    """
    for name, value in (("eps", eps), ("step_size", step_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(
                f"{name} must be a number in [0, 1] (inputs live in [0, 1]), got {value!r}. "
                f"Fix: give {name} on the [0, 1] pixel scale, e.g. {name}=8/255 rather than 8."
            )
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}. Fix: e.g. steps=10 for training, 20 for evaluation.")


def resolve_start(random_start: RandomStart, loss: AttackLoss) -> Optional[StartKind]:
    """The start kind: ``True`` means ``"uniform"`` for ``"ce"`` and ``"normal"`` for ``"kl"``; ``False`` means ``None`` (start at ``x``).

    Raises:
        ValueError: for any other value.
    """
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


def validate_attack(
    x: torch.Tensor, *, loss: str, eps: float, step_size: float, steps: int, random_start: RandomStart
) -> Optional[StartKind]:
    """Every check of one :func:`pgd_linf` call, run once before its loop; returns the start kind.

    Checks the threat model (:func:`validate_threat_model`), the attack loss, ``random_start``
    (:func:`resolve_start`) and ``0 <= x <= 1`` (one device synchronization: ``aminmax``
    read back in one transfer).

    Raises:
        ValueError: naming the argument and the fix.
    """
    validate_threat_model(eps, step_size, steps)
    if loss not in ATTACK_LOSSES:
        raise ValueError(f"Unknown attack loss {loss!r}. Fix: use one of {', '.join(ATTACK_LOSSES)}.")
    start = resolve_start(random_start, loss)
    if x.numel():
        low, high = torch.stack(torch.aminmax(x.detach())).tolist()
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"Attack inputs must lie in [0, 1], got range [{low:.4g}, {high:.4g}]. "
                "Fix: feed unnormalized images and put the mean/std normalization inside the model "
                "(e.g. as its first layer), so that eps is measured in pixel units."
            )
    return start


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


def attack_objective(
    logits: torch.Tensor, y: torch.Tensor, loss: AttackLoss, clean_probs: Optional[torch.Tensor]
) -> torch.Tensor:
    """``[B]`` rows of the attack objective; PGD ascends their sum.

    ``"ce"``: ``L_i = CE(logits_i, y_i)``. ``"kl"``: ``L_i = sum_k p_k(x_i) (log p_k(x_i) - log p_k(x_adv_i))``
    with ``p(x) = clean_probs``. Row ``i`` depends on example ``i`` only, so the input gradient of
    the sum has row ``i`` equal to the gradient of ``L_i``.
    """
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    return F.kl_div(F.log_softmax(logits, dim=1), clean_probs, reduction="none").sum(dim=1)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """``clamp(min(max(x_adv, x - eps), x + eps), 0, 1)``: onto the L-infinity ball, then onto ``[0, 1]``."""
    return torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0.0, 1.0)


def random_start_point(x: torch.Tensor, eps: float, kind: StartKind, generator: Optional[torch.Generator]) -> torch.Tensor:
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

    ``x^{(t+1)} = project(x^{(t)} + step_size * sign(grad_{x^{(t)}} sum_i L_i(x^{(t)})), x, eps)``,
    ``L_i`` from :func:`attack_objective`.

    Args:
        model: any network (plain or ENGM-wrapped); its mode is kept.
        x: ``[B, ...]`` clean inputs in ``[0, 1]``.
        y: ``[B]`` labels (used by ``loss="ce"``).
        loss: ``"ce"`` maximizes cross-entropy; ``"kl"`` maximizes ``KL(p(x) || p(x_adv))``.
        eps: L-infinity radius in ``[0, 1]``.
        step_size: step ``alpha`` in ``[0, 1]``.
        steps: number of steps (``0`` returns the projected start).
        random_start: ``True``: uniform in the eps-ball for ``"ce"``, ``x + 0.001 N(0,1)`` for ``"kl"``
            (at ``x_adv = x`` the KL gradient is zero); ``"uniform"``/``"normal"`` force one; ``False``: start at ``x``.
        clean_logits: logits of ``x`` for the KL target (detached); computed here under
            ``torch.no_grad()``, in the model's current mode, when ``None``.
        generator: RNG for the random start (the global RNG when ``None``).
        return_input_grad: also return the input gradient of the last step.

    Returns:
        ``x_adv`` (detached), or ``(x_adv, input_grad)`` where ``input_grad`` is
        ``grad_{x'} sum_i L_i(x'_i)`` at ``x' = x^{(steps-1)}``, the iterate *before* the
        last sign step (the gradient whose sign made that step); row ``i`` is the
        gradient of example ``i``'s own attack objective; ``None`` when ``steps == 0``.

    Raises:
        ValueError: ``eps``/``step_size`` outside ``[0, 1]``, bad ``steps``/``loss``/``random_start``,
            or inputs outside ``[0, 1]`` (all checked once, by :func:`validate_attack`).
    """
    x = x.detach()
    start = validate_attack(x, loss=loss, eps=eps, step_size=step_size, steps=steps, random_start=random_start)
    clean_probs = None
    if loss == "kl":
        if clean_logits is None:
            with torch.no_grad():
                clean_logits = model(x)
        clean_probs = F.softmax(clean_logits.detach(), dim=1)
    x_adv = x.clone() if start is None else random_start_point(x, eps, start, generator)
    input_grad: Optional[torch.Tensor] = None
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            objective = attack_objective(model(x_adv), y, loss, clean_probs).sum()
        (input_grad,) = torch.autograd.grad(objective, x_adv)
        x_adv = project(x_adv.detach() + step_size * torch.sign(input_grad), x, eps)
    x_adv = project(x_adv.detach(), x, eps)
    if return_input_grad:
        return x_adv, input_grad
    return x_adv
