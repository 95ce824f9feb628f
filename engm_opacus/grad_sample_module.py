"""Opacus ``GradSampleModule`` that lets an unchanged AT script run its attack through the wrapped model.

An attack differentiates the loss w.r.t. the *input* only (``torch.autograd.grad(loss, x)``),
often in eval mode. Opacus's hooks would then either fail (eval mode: no activations were
captured) or silently record the attack's per-sample gradients next to the training ones.
Here a module's backward hook does per-sample work only when the backward pass will
accumulate into that module's parameters; otherwise it drops the activations it captured.

As in Opacus, each forward is paired with one backward (last in, first out). A second,
input-only backward over the *training* forward's graph (``retain_graph=True``, e.g. a
gradient-norm penalty) would consume that forward's activations: run it inside
:func:`engm_opacus.attacks.per_example_hooks_paused`.
"""

from __future__ import annotations

from typing import Any

import torch
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.grad_sample_module import promote_current_grad_sample
from opacus.utils.module_utils import trainable_parameters
from torch import nn
from torch.autograd.graph import _get_grad_fn_or_grad_acc


def backward_reaches_parameters(module: nn.Module) -> bool:
    """``True`` when the running backward pass will accumulate a gradient into a trainable parameter of ``module``."""
    return any(
        torch._C._will_engine_execute_node(_get_grad_fn_or_grad_acc(p)) for _, p in trainable_parameters(module)
    )


def discard_latest_activations(module: nn.Module) -> None:
    """Forget the activations of ``module``'s most recent forward, keeping Opacus's counters consistent."""
    module.activations.pop()
    for _, p in trainable_parameters(module):
        p._forward_counter -= 1
        if p._forward_counter == 0 and hasattr(p, "_current_grad_sample"):
            promote_current_grad_sample(p)
    if not module.activations and hasattr(module, "max_batch_len"):
        del module.max_batch_len


class SkipsInputOnlyBackward:
    """Mixin for Opacus grad-sample hooks: skip backward passes that do not reach the parameters.

    Such passes are attacks (gradient w.r.t. the input); forwards run in eval mode or
    under ``no_grad`` captured nothing and are skipped too.
    """

    def capture_backprops_hook(self, module: nn.Module, *args: Any, **kwargs: Any) -> None:
        """Opacus's backward hook, run only when this backward reaches ``module``'s parameters."""
        if not self.hooks_enabled or not getattr(module, "activations", None):
            return
        if not backward_reaches_parameters(module):
            discard_latest_activations(module)
            return
        super().capture_backprops_hook(module, *args, **kwargs)


class ENGMGradSampleModule(SkipsInputOnlyBackward, GradSampleModule):
    """Opacus ``GradSampleModule`` (hooks or functorch) whose per-sample gradients come only from training backward passes."""
