"""``make_engm`` refuses a trainable parameter no per-example rule covers, naming the layer."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import nets


def test_trainable_custom_parameter_layer_raises_value_error_naming_it() -> None:
    from engm_opacus import make_engm

    model = nets.with_custom_layer(trainable=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError) as info:
        make_engm(model, optimizer, gamma=1.0)
    message = str(info.value)
    assert "rescale" in message or "ScaleByParam" in message, message


def test_frozen_custom_parameter_layer_is_accepted() -> None:
    from engm_opacus import make_engm

    model = nets.with_custom_layer(trainable=False)
    make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=1.0)
