"""The ``nn.Embedding`` rule: Opacus's per-sample gradients with the ``padding_idx`` row kept at zero.

``dL/dE^(i)[v] = sum_{t: token_{i,t} = v} b_{i,t}`` for every vocabulary row ``v`` except
``padding_idx``, which ``nn.Embedding`` never updates (its gradient is zero). Opacus's sampler
omits that exception, so the row is zeroed here.
"""

from __future__ import annotations

from opacus.grad_sample import GradSampleModule
from torch import nn

from engm_opacus.per_example.records import LayerCall
from engm_opacus.per_example.rules.base import OpacusGradSamplerRule, ParamTensors, register_rule


@register_rule(nn.Embedding)
class EmbeddingRule(OpacusGradSamplerRule):
    """Per-example gradients of ``nn.Embedding``, ``padding_idx`` respected."""

    def __init__(self) -> None:
        super().__init__(GradSampleModule.GRAD_SAMPLERS[nn.Embedding])

    def per_example_grads(self, layer: nn.Embedding, call: LayerCall) -> ParamTensors:
        """Opacus's per-sample gradients, row ``padding_idx`` set to zero."""
        grads = super().per_example_grads(layer, call)
        if layer.padding_idx is not None and layer.weight in grads:
            grads[layer.weight][:, layer.padding_idx] = 0
        return grads
