"""Independent ENGM references the library must match: explicit per-example gradients, then SGD.

Nothing here imports ``engm_opacus``. Two ways to get the per-example gradients ``g_i``:

* ``per_example_grads_loop``: ``g_i = grad_theta l_i``, one example at a time (models without
  BatchNorm, where examples do not interact).
* ``per_example_grads_copies``: the contract's definition for any model, BatchNorm included.
  Every leaf module with trainable parameters gets ``B`` copies ``P[j]`` of its parameters and
  row ``j`` of its output is computed with ``P[j]`` (training-mode BatchNorm still normalizes
  with the statistics of the whole input). For the loss ``L`` of one batch of ``B`` rows,
  ``g_j = scale * dL/dP[j]`` with ``scale = B`` for a mean-reduced loss (1 for a sum). A layer
  called several times (TRADES: ``model(x)`` and ``model(x_adv)``) uses the same ``P`` in every
  call, so its calls are summed.

Then ``naive_engm_step``: ``n_i = ||g_i||_2``, ``w_i = 1 / max(n_i, gamma)``,
``d = (1/N) sum_i w_i g_i`` written to ``p.grad`` and a plain ``torch.optim.SGD`` step.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.func import functional_call

LossFn = Callable[..., torch.Tensor]
"""``loss_fn(model, *batch_tensors) -> scalar`` mean-reduced over the rows of the batch tensors."""

PerExample = list[list[torch.Tensor]]
"""``grads[i][k]``: gradient of example ``i`` for the ``k``-th trainable parameter."""


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters with ``requires_grad``, in ``model.parameters()`` order."""
    return [p for p in model.parameters() if p.requires_grad]


def _rows(tensors: Sequence[torch.Tensor], start: int, stop: int) -> list[torch.Tensor]:
    return [t[start:stop] for t in tensors]


def per_example_grads_loop(model: nn.Module, loss_fn: LossFn, *batch: torch.Tensor) -> PerExample:
    """``g_i = grad_theta loss_fn(model, *rows_i)``, one example (row) at a time."""
    params = trainable(model)
    out: PerExample = []
    for i in range(len(batch[0])):
        loss = loss_fn(model, *_rows(batch, i, i + 1))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out.append([torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params)])
    return out


@contextlib.contextmanager
def parameter_copies(model: nn.Module, batch_size: int) -> Iterator[dict[int, torch.Tensor]]:
    """Patch every leaf module with trainable parameters so that row ``j`` uses copy ``P[j]``.

    Yields ``{id(parameter): P}`` with ``P`` of shape ``[batch_size, *parameter.shape]``. The
    module's real buffers are never touched (each row's call gets clones), so running statistics
    are not updated; run the loss once more under ``no_grad`` to update them like a real step.
    """
    copies: dict[int, torch.Tensor] = {}
    patched: list[nn.Module] = []
    for module in model.modules():
        own = dict(module.named_parameters(recurse=False))
        train = {n: p for n, p in own.items() if p.requires_grad}
        if not train:
            continue
        if any(True for _ in module.children()):
            raise NotImplementedError(f"reference cannot copy parameters of non-leaf {type(module).__name__}")
        if any(id(p) in copies for p in train.values()):
            raise NotImplementedError("reference does not support tied parameters")
        stacks = {n: p.detach().unsqueeze(0).expand(batch_size, *p.shape).clone().requires_grad_() for n, p in train.items()}
        for n, p in train.items():
            copies[id(p)] = stacks[n]
        frozen = {n: p for n, p in own.items() if not p.requires_grad}
        shadow = copy.deepcopy(module)

        def forward(*args, _module=module, _shadow=shadow, _stacks=stacks, _frozen=frozen, **kwargs):
            rows = args[0].shape[0]
            if rows != batch_size:
                raise ValueError(f"reference built for {batch_size} rows, called with {rows}")
            _shadow.train(_module.training)
            outputs = []
            for j in range(rows):
                state = {n: s[j] for n, s in _stacks.items()}
                state.update(_frozen)
                state.update({n: b.clone() for n, b in _module.named_buffers(recurse=False)})
                outputs.append(functional_call(_shadow, state, args, kwargs)[j])
            return torch.stack(outputs)

        module.forward = forward
        patched.append(module)
    try:
        yield copies
    finally:
        for module in patched:
            del module.forward


def per_example_grads_copies(model: nn.Module, loss_fn: LossFn, *batch: torch.Tensor, scale: float | None = None) -> PerExample:
    """``g_j = scale * dL/dP[j]`` with per-example parameter copies (any model, BatchNorm included).

    ``scale`` defaults to the number of rows (mean-reduced loss). Buffers (BatchNorm running
    statistics) are restored after the copies' pass and then updated once, as one real forward of
    ``loss_fn`` would.
    """
    rows = len(batch[0])
    scale = float(rows) if scale is None else scale
    params = trainable(model)
    buffers = [b.detach().clone() for b in model.buffers()]
    with parameter_copies(model, rows) as copies:
        loss = loss_fn(model, *batch)
        stacks = [copies[id(p)] for p in params]
        grads = torch.autograd.grad(loss, stacks, allow_unused=True)
    with torch.no_grad():
        for b, saved in zip(model.buffers(), buffers):  # modules without trainable parameters ran for real
            b.copy_(saved)
        loss_fn(model, *batch)
    grads = [torch.zeros_like(s) if g is None else g.detach() for g, s in zip(grads, stacks)]
    return [[scale * g[j] for g in grads] for j in range(rows)]


def naive_norms(per_example: PerExample) -> torch.Tensor:
    """``n_i = ||g_i||_2`` over all trainable parameters."""
    return torch.stack([torch.sqrt(sum((g**2).sum() for g in grads)) for grads in per_example])


def naive_direction(per_example: PerExample, gamma: float) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """``d = (1/N) sum_i w_i g_i`` with ``w_i = 1/max(n_i, gamma)``; returns ``(d, norms, weights)``."""
    norms = naive_norms(per_example)
    weights = 1.0 / torch.clamp(norms, min=gamma)
    direction = [torch.zeros_like(g) for g in per_example[0]]
    for grads, w in zip(per_example, weights):
        for total, g in zip(direction, grads):
            total.add_(w * g)
    return [total / len(per_example) for total in direction], norms, weights


def naive_engm_step(model: nn.Module, sgd: torch.optim.Optimizer, per_example: PerExample, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Write ``d`` to ``p.grad`` of the trainable parameters ``sgd`` holds and take a plain SGD step.

    ``per_example`` covers ``trainable(model)``; the norms use only the parameters ``sgd`` holds.
    Returns ``(norms, weights)``.
    """
    held_ids = {id(p) for group in sgd.param_groups for p in group["params"]}
    held = [k for k, p in enumerate(trainable(model)) if id(p) in held_ids]
    per_example = [[grads[k] for k in held] for grads in per_example]
    direction, norms, weights = naive_direction(per_example, gamma)
    for p in model.parameters():
        p.grad = None
    params = trainable(model)
    for k, d in zip(held, direction):
        params[k].grad = d.clone()
    sgd.step()
    for p in model.parameters():
        p.grad = None
    return norms, weights


def gamma_between(norms: torch.Tensor) -> float:
    """A gamma strictly inside the spread of ``norms`` (midpoint of the two middle values)."""
    ordered = torch.sort(norms).values
    lower = (len(ordered) // 2) - 1
    return float((ordered[lower] + ordered[lower + 1]) / 2)
