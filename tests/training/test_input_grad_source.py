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
    expected = {"input_grad_source": source, **({"attack_loss_reduction": "sum"} if source == "attack" else {})}
    assert engm_options_for(config, get_at_loss(method)) == expected


def test_an_explicit_source_and_other_optimizers_are_left_alone() -> None:
    config = TrainConfig(optimizer="engm-input-norm", engm_options={"input_grad_source": "backward"}).validate()
    assert engm_options_for(config, get_at_loss("pgd-at")) == {"input_grad_source": "backward"}
    assert engm_options_for(TrainConfig(optimizer="engm").validate(), get_at_loss("pgd-at")) == {}


def test_the_harness_attack_gives_each_example_the_same_estimate_in_any_batch_size() -> None:
    """pgd_linf ascends the sum of the per-row objectives: with attack_loss_reduction="sum" an example's m_i (and its
    estimate) is the same in a batch of 6 and in a last batch of 2."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from engm_opacus import make_engm
    from engm_opacus.at.attacks import pgd_linf

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    generator = torch.Generator().manual_seed(1)
    x, y = torch.rand(6, 5, generator=generator, dtype=torch.float64), torch.randint(0, 3, (6,), generator=generator)
    wrapped, optimizer = make_engm(
        model, torch.optim.SGD(model.parameters(), lr=0.0), gamma=1.0, variant="input-norm", input_grad_source="attack",
        attack_loss_reduction="sum", input_norm_scale=1.0,
    )
    estimates = []
    for rows in (6, 2):
        x_adv = pgd_linf(wrapped, x[:rows], y[:rows], eps=0.1, step_size=0.03, steps=2, random_start=False)
        F.cross_entropy(wrapped(x_adv), y[:rows]).backward()
        optimizer.step()
        optimizer.zero_grad()
        estimates.append(optimizer.last_step.per_example_norms[:2])
    torch.testing.assert_close(estimates[0], estimates[1], rtol=1e-12, atol=0)
