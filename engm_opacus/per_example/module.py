"""``ENGMModule``: an Opacus ``GradSampleModule`` that records, during the user's own backward, what ENGM needs.

Opacus pairs each layer's forward with "its" backward through a per-layer stack and a full
backward hook; that pairing breaks when a forward has no backward (or the other way round), and
the full backward hook refuses in-place changes of a layer's output (``out += shortcut``). Here,
every training forward of a layer with trainable parameters registers a hook on *that call's*
output tensor, which receives ``b = dL/d output`` of exactly the backward passes that run through
that call. So the pairing is exact by construction, for any number of calls, eval-mode passes,
attacks and in-place residual adds.

A backward pass is recorded only where it will accumulate into the layer's parameters (as
``p.grad`` does): an attack differentiating w.r.t. the input records nothing. Records are grouped
by backward pass (``torch._C._current_graph_task_id``) and cleared by ``zero_grad()`` together
with ``p.grad``. No per-example work is done in the backward: the optimizer turns the records into
norms and the weighted gradient at ``step()``.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Literal, Mapping, Optional, Set, Tuple

import torch
from opacus.grad_sample import GradSampleModule
from torch import nn
from torch.autograd.graph import _get_grad_fn_or_grad_acc

from engm_opacus.per_example.records import BackwardRecord, LayerCall
from engm_opacus.per_example.rules import rule_for
from engm_opacus.per_example.rules.base import PerExampleGradRule


def layers_with_parameters(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """``(name, module)`` for every module that owns parameters directly."""
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            yield name, module


def unsupported_layers_error(model: nn.Module) -> ValueError | None:
    """One ``ValueError`` naming every trainable layer without a per-example rule, or ``None``."""
    unsupported = [
        f"{name or '<root>'} ({type(module).__name__})"
        for name, module in layers_with_parameters(model)
        if any(p.requires_grad for p in module.parameters(recurse=False)) and rule_for(module) is None
    ]
    if not unsupported:
        return None
    listed = "\n".join(f"  - {entry}" for entry in unsupported)
    return ValueError(
        "make_engm cannot compute per-example gradients for these trainable layers:\n"
        f"{listed}\n"
        "ENGM supports nn.Linear, nn.Conv1d/2d/3d, nn.BatchNorm1d/2d/3d, nn.GroupNorm and every layer Opacus "
        "has a grad sampler for (LayerNorm, Embedding, InstanceNorm, RMSNorm, ...), by exact type, with the "
        "parameters used only inside the layer's forward. Fix: build the model from these layers, freeze the "
        "others (p.requires_grad_(False)), or register a rule with "
        "engm_opacus.per_example.rules.register_rule (or an Opacus grad sampler with "
        "opacus.grad_sample.register_grad_sampler)."
    )


InputGradSource = Literal["backward", "attack"]
INPUT_GRAD_SOURCES = ("backward", "attack")
RowWeights = Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]
"""The fast path's ``[B]`` attack input-gradient norms -> ``([B] output-gradient factors, [B] estimated norms)``."""

SAVED_INPUT = {
    "ConvolutionBackward0": "_saved_input",
    "NativeBatchNormBackward0": "_saved_input",
    "NativeGroupNormBackward0": "_saved_input",
    "AddmmBackward0": "_saved_mat1",
    "MmBackward0": "_saved_self",
}
"""Autograd nodes of the supported layers and the attribute holding the layer's input."""


def saved_input_attribute(output: torch.Tensor, forward_input: Tuple[Any, ...]) -> Optional[str]:
    """The attribute of ``output.grad_fn`` that holds the layer's only input (same shape), or ``None``."""
    attribute = SAVED_INPUT.get(type(output.grad_fn).__name__)
    if attribute is None or len(forward_input) != 1:
        return None
    try:
        saved = getattr(output.grad_fn, attribute)
    except RuntimeError:  # not saved for this backward (e.g. frozen weight)
        return None
    return attribute if isinstance(saved, torch.Tensor) and saved.shape == forward_input[0].shape else None


def will_accumulate(accumulator: Any) -> bool:
    """``True`` when the running backward pass will run ``accumulator`` (a parameter's
    ``AccumulateGrad`` node), i.e. accumulate a gradient into ``p.grad``.

    ``torch.autograd.grad`` never accumulates into ``.grad``; when the parameter is one of its
    inputs, PyTorch refuses the query for its accumulator node, which therefore means "no".
    """
    try:
        return torch._C._will_engine_execute_node(accumulator)
    except RuntimeError as error:
        if "autograd.grad()" in str(error):
            return False
        raise


class ENGMModule(GradSampleModule):
    """The model wrapped for ENGM: same forward, state_dict keys of the plain model, records for the optimizer.

    Args:
        m: the plain model (every trainable layer must have a rule: see
            :func:`unsupported_layers_error`).
        loss_reduction: ``"mean"`` (the loss of each backward is the mean over its rows, as
            ``CrossEntropyLoss()`` and the AT reference codes compute it) or ``"sum"``.
        input_grad_source: what the input-norm variant reads: ``"backward"`` records the gradient
            of the training loss w.r.t. the model's floating-point positional inputs;
            ``"attack"`` keeps the per-row norms of the last input gradient an attack computed
            (a forward whose input requires grad) and hands them to the training forward that
            follows (a forward whose inputs do not); ``None`` (exact ENGM): neither.

    Attributes:
        recording: record layer calls (``False`` on the input-norm fast path's steps, where no
            per-example quantity beyond the input-gradient norms is needed).
        row_weights: on the fast path, maps the attack's ``[B]`` input-gradient norms to
            ``(factors, estimated norms)``; a training forward's output gradient is scaled row by
            row by ``factors`` in every backward pass that reaches the parameters, so ``p.grad``
            accumulates ``sum_i w_i grad l_i`` directly. Set by the optimizer.
    """

    def __init__(self, m: nn.Module, *, loss_reduction: str = "mean", input_grad_source: Optional[InputGradSource] = None):
        if input_grad_source not in (None, *INPUT_GRAD_SOURCES):
            raise ValueError(f"input_grad_source must be one of {', '.join(INPUT_GRAD_SOURCES)}, got {input_grad_source!r}.")
        error = unsupported_layers_error(m)
        if error is not None:
            raise error
        self._records: Dict[int, BackwardRecord] = {}
        self._accumulated: Set[nn.Parameter] = set()
        self._accumulators: Dict[nn.Parameter, Any] = {}
        super().__init__(m, batch_first=True, loss_reduction=loss_reduction, strict=False)
        self.input_grad_source = input_grad_source
        self.recording = True
        self.row_weights: Optional[RowWeights] = None
        self._attack_input_norms: Optional[torch.Tensor] = None
        self._accumulate_handles = [
            p.register_post_accumulate_grad_hook(self._on_accumulate) for p in m.parameters() if p.requires_grad
        ]

    def add_hooks(self, *, loss_reduction: str = "mean", batch_first: bool = True, force_functorch: bool = False) -> None:
        """Register one forward hook per layer that owns parameters (no full backward hooks)."""
        if hasattr(self._module, "autograd_grad_sample_hooks"):
            raise ValueError(
                "This model already carries Opacus hooks (it was wrapped before, or deep-copied from a wrapped model). "
                "Fix: pass a plain model to make_engm, once (deep-copy it before wrapping, not after)."
            )
        self._module.autograd_grad_sample_hooks = []
        self.autograd_grad_sample_hooks = self._module.autograd_grad_sample_hooks
        for _, layer in layers_with_parameters(self._module):
            if rule_for(layer) is not None:
                self.autograd_grad_sample_hooks.append(layer.register_forward_hook(self.capture_activations_hook))
        self.enable_hooks()

    def remove_hooks(self) -> None:
        """Remove the forward hooks and the gradient-accumulation hooks."""
        super().remove_hooks()
        for handle in getattr(self, "_accumulate_handles", []):
            handle.remove()
        self._accumulate_handles = []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The plain model's forward; for the input-norm variant, inputs or outputs also get gradient hooks.

        ``input_grad_source="backward"``: float inputs report the training loss's input gradient.
        ``"attack"``: a forward whose first float input requires grad is an attack's, and reports
        the per-row norms of its input gradient; any other forward is a training forward, whose
        output is hooked to pair its backward with the last attack norms (and, on the fast path,
        to scale its rows by ``w_i``).
        """
        if self.input_grad_source is None or not self.hooks_enabled or not torch.is_grad_enabled():
            return self._module(*args, **kwargs)
        if self.input_grad_source == "backward":
            return self._module(*(self._tap_input(a, self._capture_input_grad) for a in args), **kwargs)
        first = next((a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
        if first is not None and first.requires_grad:
            output = self._module(*(self._tap_input(a, self._capture_attack_grad) if a is first else a for a in args), **kwargs)
            if self.row_weights is not None and isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(self._unweighted_backward_hook)
            return output
        output = self._module(*args, **kwargs)
        if first is not None:
            self._hook_training_output(output, len(first))
        return output

    def _tap_input(self, value: Any, hook: Callable[[torch.Tensor], None]) -> Any:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return value
        tapped = value.view_as(value) if value.requires_grad else value.detach().requires_grad_(True)
        if tapped.is_leaf:
            tapped = tapped.view_as(tapped)  # a hook on a non-leaf is dropped with its graph
        tapped.register_hook(hook)
        return tapped

    def _capture_input_grad(self, grad: torch.Tensor) -> None:
        if self.hooks_enabled and self._reaches_parameters():
            self._current_record().input_grads.append(grad.detach())

    def _capture_attack_grad(self, grad: torch.Tensor) -> None:
        """Keep ``||dL_attack/dx_i||_2`` per row of the latest attack gradient (overwriting the previous one)."""
        if self.hooks_enabled:
            self._attack_input_norms = torch.linalg.vector_norm(grad.detach().flatten(1).double(), dim=1)

    def _hook_training_output(self, output: Any, rows: int) -> None:
        """Pair this training forward with the last attack norms; on the fast path fix its weights now."""
        fast = self.row_weights is not None
        if not isinstance(output, torch.Tensor):
            if fast:
                raise TypeError(
                    f"The model returned a {type(output).__name__}; the input-norm variant with input_grad_source='attack' "
                    "scales the rows of the model's output gradient and needs one output tensor. Fix: return the logits "
                    "tensor, or use input_grad_source='backward'."
                )
            return
        if not output.requires_grad:
            return
        norms = self._attack_input_norms
        paired = norms if norms is not None and len(norms) == rows else None
        factors, estimates = self.row_weights(paired) if fast and paired is not None else (None, None)
        output.register_hook(partial(self._training_backward_hook, paired, factors, estimates, rows))

    def _training_backward_hook(
        self, norms: Optional[torch.Tensor], factors: Optional[torch.Tensor], estimates: Optional[torch.Tensor], rows: int,
        grad: torch.Tensor,
    ) -> Optional[torch.Tensor]:
        if not self.hooks_enabled or not self._reaches_parameters():
            return None
        if norms is None:
            raise RuntimeError(
                f"A training forward on {rows} rows reached the parameters, but no attack input gradient on {rows} rows "
                "came before it. input_grad_source='attack' reuses the attack's last input gradient (a forward of "
                "the wrapped model on an input that requires grad, differentiated w.r.t. that input). Fix: run the attack "
                "through the model make_engm returned, on the same rows, or use input_grad_source='backward'."
            )
        record = self._current_record()
        record.attack_input_norms = norms
        if factors is None:
            return None
        record.weighted_rows, record.estimated_norms = rows, estimates
        wide = grad if grad.dtype in (torch.float32, torch.float64) else grad.float()  # w_i * B can overflow float16
        scaled = wide * factors.to(device=grad.device, dtype=wide.dtype).view(-1, *(1,) * (grad.dim() - 1))
        return scaled.to(grad.dtype)

    def _unweighted_backward_hook(self, grad: torch.Tensor) -> None:
        """Fast path: mark a backward pass that reaches the parameters through an attack-style forward (not weighted)."""
        if self.hooks_enabled and self._reaches_parameters():
            self._current_record().unweighted = True

    def _on_accumulate(self, p: torch.Tensor) -> None:
        if not self.hooks_enabled:
            return
        self._accumulated.add(p)
        if self.row_weights is not None:
            self._current_record().accumulated = True

    def forget_attack_gradient(self) -> None:
        """Drop the last attack's input-gradient norms (each step pairs with an attack of its own)."""
        self._attack_input_norms = None

    def _reaches_parameters(self) -> bool:
        """Whether the running backward pass accumulates into some trainable parameter's ``.grad``."""
        return any(will_accumulate(self._accumulator(p)) for p in self._trainable())

    def capture_activations_hook(self, module: nn.Module, forward_input: Tuple[Any, ...], forward_output: Any) -> None:
        """At a forward with gradients on: hook the call's output tensor; keep its inputs unless autograd keeps them.

        When the layer's input is one of the tensors autograd saved for the output's backward node
        (``_saved_input`` of a convolution or normalization, ``_saved_mat1`` of a Linear's ``addmm``),
        nothing is kept here: the backward hook reads it from that node, so a backward that does not
        reach the parameters (an attack) frees it as plain autograd does.
        """
        if not self.recording or not self.hooks_enabled or not torch.is_grad_enabled():
            return
        if not isinstance(forward_output, torch.Tensor) or not forward_output.requires_grad:
            return
        params = tuple(p for p in module.parameters(recurse=False) if p.requires_grad)
        if not params:
            return
        if not forward_input or not isinstance(forward_input[0], torch.Tensor):
            raise ValueError(
                f"{type(module).__name__} was called without a positional tensor input; ENGM records a layer's "
                "first positional input. Fix: call the layer as layer(x)."
            )
        saved_as = saved_input_attribute(forward_output, forward_input)
        activations = None if saved_as else [t.detach() if isinstance(t, torch.Tensor) else t for t in forward_input]
        call = LayerCall(
            layer=module,
            activations=activations,
            versions=[] if activations is None else [t._version if isinstance(t, torch.Tensor) else 0 for t in activations],
            forward_state=rule_for(module).forward_state(module, forward_input, forward_output),
            params=params,
            saved_as=saved_as,
        )
        forward_output.register_hook(partial(self.capture_backprops_hook, call))

    def capture_backprops_hook(self, call: LayerCall, backprops: torch.Tensor) -> None:
        """At the backward of one call: record ``dL/d output`` if this pass reaches the call's parameters."""
        if not self.hooks_enabled:
            return
        reached = tuple(p for p in call.params if will_accumulate(self._accumulator(p)))
        if not reached:
            return
        activations, versions = call.activations, call.versions
        if activations is None:  # the node producing this output is the one running now
            activations = [getattr(torch._C._current_autograd_node(), call.saved_as).detach()]
            versions = [activations[0]._version]
        completed = LayerCall(call.layer, activations, versions, call.forward_state, reached, backprops.detach())
        rule = rule_for(call.layer)
        if isinstance(rule, PerExampleGradRule):  # small per-example gradients: keep them, not a and b
            with torch.no_grad():
                self._current_record().add_per_example(call.layer, rule.per_example_grads(call.layer, completed))
        else:
            self._current_record().add(completed)

    def _accumulator(self, p: nn.Parameter) -> Any:
        """``p``'s ``AccumulateGrad`` node, kept alive here so that autograd reuses it (as DDP does)."""
        node = self._accumulators.get(p)
        if node is None:
            node = self._accumulators[p] = _get_grad_fn_or_grad_acc(p)
        return node

    def _current_record(self) -> BackwardRecord:
        return self._records.setdefault(torch._C._current_graph_task_id(), BackwardRecord())

    def _trainable(self) -> Iterator[nn.Parameter]:
        return (p for p in self._module.parameters() if p.requires_grad)

    def take_records(self) -> Tuple[List[BackwardRecord], Set[nn.Parameter]]:
        """Hand over the records of every backward pass since the last call, and the parameters
        whose ``.grad`` those passes accumulated into; forget both."""
        records, accumulated = list(self._records.values()), set(self._accumulated)
        self.clear_records()
        return records, accumulated

    def clear_records(self) -> None:
        """Forget all records (``zero_grad`` does this together with ``p.grad``)."""
        self._records = {}
        self._accumulated.clear()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``p.grad`` and the records."""
        self.clear_records()
        super().zero_grad(set_to_none)

    def state_dict(self, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        """The plain model's ``state_dict`` (no ``_module.`` prefix): checkpoints load into either."""
        return self._module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load a plain model's ``state_dict``."""
        return self._module.load_state_dict(state_dict, strict=strict, assign=assign)
