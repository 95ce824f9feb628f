"""The harness picks the input-norm variant's input-gradient source from the AT method unless the config names one."""

from __future__ import annotations

import pytest

from engm_opacus.at.losses import get_at_loss
from engm_opacus.training.build import engm_options_for
from engm_opacus.training.config import TrainConfig


@pytest.mark.parametrize(
    ("method", "source"), [("pgd-at", "attack"), ("awp-pgd-at", "attack"), ("trades", "backward"), ("mart", "backward"), ("awp-trades", "backward")]
)
def test_attack_source_only_where_the_attack_maximizes_the_training_loss(method: str, source: str) -> None:
    config = TrainConfig(optimizer="engm-input-norm", at_method=method).validate()
    assert engm_options_for(config, get_at_loss(method)) == {"input_grad_source": source}


def test_an_explicit_source_and_other_optimizers_are_left_alone() -> None:
    config = TrainConfig(optimizer="engm-input-norm", engm_options={"input_grad_source": "backward"}).validate()
    assert engm_options_for(config, get_at_loss("pgd-at")) == {"input_grad_source": "backward"}
    assert engm_options_for(TrainConfig(optimizer="engm").validate(), get_at_loss("pgd-at")) == {}
