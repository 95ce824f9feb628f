"""An unchanged AT script runs its own attack through the model make_engm returns."""

from __future__ import annotations

import copy

import pytest
import torch
from models import build, inputs_for
from naive import naive_engm_step
from torch import nn

from engm_opacus import make_engm

GAMMA = 0.3


def fgsm_input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A user's attack step: gradient of the loss w.r.t. the input only."""
    x = x.clone().requires_grad_(True)
    return torch.autograd.grad(nn.functional.cross_entropy(model(x), y), x)[0]


@pytest.mark.parametrize("attack_mode", ["train", "eval"])
@pytest.mark.parametrize("grad_sample_mode", ["hooks", "functorch"])
def test_input_gradient_attack_leaves_no_per_sample_gradients(attack_mode: str, grad_sample_mode: str) -> None:
    x, y = inputs_for("cnn", 6, torch.Generator().manual_seed(0))
    reference = build("cnn")
    engm_model = copy.deepcopy(reference)
    wrapped, optimizer = make_engm(engm_model, torch.optim.SGD(engm_model.parameters(), lr=0.5, momentum=0.9), gamma=GAMMA, grad_sample_mode=grad_sample_mode)
    reference_sgd = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
    for _ in range(2):
        wrapped.train(attack_mode == "train")
        x_adv = (x + 0.1 * fgsm_input_grad(wrapped, x, y).sign()).clamp(0, 1)
        wrapped.train()
        assert all(getattr(p, "grad_sample", None) is None for p in engm_model.parameters())
        nn.functional.cross_entropy(wrapped(x_adv), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        naive_engm_step(reference, reference_sgd, x_adv, y, GAMMA)
    for p, q in zip(engm_model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10)


def test_attack_between_training_forward_and_backward() -> None:
    """Forward on clean x (kept), attack forward+backward, then the training backward: LIFO pairing holds."""
    x, y = inputs_for("cnn", 6, torch.Generator().manual_seed(1))
    reference = build("cnn")
    engm_model = copy.deepcopy(reference)
    wrapped, optimizer = make_engm(engm_model, torch.optim.SGD(engm_model.parameters(), lr=0.5), gamma=GAMMA)
    clean_loss = nn.functional.cross_entropy(wrapped(x), y, reduction="none")
    fgsm_input_grad(wrapped, x, y)
    optimizer.backward(clean_loss)
    optimizer.step()
    naive_engm_step(reference, torch.optim.SGD(reference.parameters(), lr=0.5), x, y, GAMMA)
    for p, q in zip(engm_model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10)
