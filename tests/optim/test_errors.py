"""Every way the one-backward contract can be broken raises an error naming the problem and the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from engm_opacus import make_engm


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()


def batch(n: int = 6):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=generator, dtype=torch.float64), torch.randint(0, 2, (n,), generator=generator)


@pytest.mark.parametrize("gamma", [0.0, -1.0, float("inf"), float("nan"), "one", None])
def test_gamma_must_be_positive_and_finite(gamma: object) -> None:
    model = small_model()
    with pytest.raises(ValueError, match="gamma must be a positive finite number"):
        make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=gamma)


def test_optimizer_must_be_a_plain_torch_optimizer() -> None:
    model = small_model()
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        make_engm(model, object(), gamma=1.0)
    _, wrapped = make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=1.0)
    with pytest.raises(TypeError, match="original_optimizer"):
        make_engm(small_model(), wrapped, gamma=1.0)


def test_unknown_variant_and_reduction_are_refused() -> None:
    model = small_model()
    with pytest.raises(ValueError, match="Unknown variant 'cheap'.*exact, input-norm"):
        make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=1.0, variant="cheap")
    with pytest.raises(ValueError, match="loss_reduction"):
        make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=1.0, loss_reduction="none")
    with pytest.raises(ValueError, match="input_norm_scale and input_grad_source apply to variant='input-norm'"):
        make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=1.0, input_norm_scale=2.0)


def test_optimizer_on_another_models_parameters_is_refused() -> None:
    model, other = small_model(), small_model()
    with pytest.raises(ValueError, match="not the model's"):
        make_engm(model, torch.optim.SGD(other.parameters(), lr=0.1), gamma=1.0)


class Scale(nn.Module):
    """A trainable layer without a per-example rule."""

    def __init__(self) -> None:
        super().__init__()
        self.factor = nn.Parameter(torch.ones(4, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def test_layer_without_rule_is_refused_by_name_and_frozen_it_is_fine() -> None:
    model = nn.Sequential(Scale(), nn.Linear(4, 2).double())
    with pytest.raises(ValueError, match=r"(?s)0 \(Scale\).*register_rule"):
        make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=1.0)
    model[0].factor.requires_grad_(False)
    make_engm(model, torch.optim.SGD(model[1].parameters(), lr=0.1), gamma=1.0)


def test_already_wrapped_or_deep_copied_wrapped_model_is_refused() -> None:
    import copy

    model = small_model()
    wrapped, _ = make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=1.0)
    with pytest.raises(ValueError, match="already wrapped"):
        make_engm(wrapped, torch.optim.SGD(model.parameters(), lr=0.1), gamma=1.0)
    copied = copy.deepcopy(model)
    with pytest.raises(ValueError, match="deep-copied"):
        make_engm(copied, torch.optim.SGD(copied.parameters(), lr=0.1), gamma=1.0)


class TiedHead(nn.Module):
    """Uses the embedding's weight outside the embedding's forward (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(5, 3).double()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.linear(self.embedding(tokens).mean(1), self.embedding.weight)


def test_gradient_outside_a_layer_forward_is_refused_at_step() -> None:
    model = TiedHead()
    wrapped, optimizer = make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=1.0)
    F.cross_entropy(wrapped(torch.randint(0, 5, (4, 3))), torch.randint(0, 5, (4,))).backward()
    with pytest.raises(RuntimeError, match=r"do not sum to p.grad for \['embedding.weight.*tied weights"):
        optimizer.step()


def test_gradients_cleared_behind_engm_back_are_refused() -> None:
    model = small_model()
    wrapped, optimizer = make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=1.0)
    x, y = batch()
    F.cross_entropy(wrapped(x), y).backward()
    for p in model.parameters():
        p.grad = None  # e.g. a second, plain optimizer's zero_grad
    F.cross_entropy(wrapped(x), y).backward()
    with pytest.raises(RuntimeError, match="do not sum to p.grad.*cleared by hand"):
        optimizer.step()
    optimizer.zero_grad()
    F.cross_entropy(wrapped(x), y).backward()
    model[0].weight.grad = None
    with pytest.raises(RuntimeError, match=r"p.grad of \['0.weight'\] was cleared"):
        optimizer.step()
    optimizer.zero_grad()
    F.cross_entropy(wrapped(x), y).backward()
    optimizer.step()  # after the returned optimizer's zero_grad every record matches p.grad


def test_layers_seeing_different_batch_sizes_in_one_backward_are_refused() -> None:
    model = small_model()
    wrapped, optimizer = make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=1.0)
    x, y = batch(6)
    loss = F.cross_entropy(wrapped(x), y) + F.cross_entropy(wrapped(x[:4]), y[:4])
    loss.backward()
    with pytest.raises(ValueError, match=r"different sizes \[4, 6\]"):
        optimizer.step()


def test_in_place_change_of_a_recorded_input_is_refused() -> None:
    layer = nn.Linear(4, 2).double()
    wrapped, optimizer = make_engm(layer, torch.optim.SGD(layer.parameters(), lr=0.1), gamma=1.0)
    x = torch.randn(3, 4, dtype=torch.float64)
    wrapped(x).sum().backward()
    x.mul_(2.0)  # after the backward, before step(): autograd cannot notice, ENGM's records would be stale
    with pytest.raises(RuntimeError, match="modified in place"):
        optimizer.step()


def test_nonfinite_norms_raise_by_default_and_skip_when_asked() -> None:
    x, y = batch()
    x[2, 0] = float("nan")
    model = small_model()
    wrapped, optimizer = make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=1.0)
    F.cross_entropy(wrapped(x), y).backward()
    with pytest.raises(FloatingPointError, match=r"examples \[2\].*on_nonfinite='skip'"):
        optimizer.step()
    model = small_model()
    before = [p.detach().clone() for p in model.parameters()]
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    wrapped, optimizer = make_engm(model, sgd, gamma=1.0, on_nonfinite="skip")
    F.cross_entropy(wrapped(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()
    assert optimizer.last_step.skipped
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert not sgd.state, "a skipped step must not create momentum buffers"


def test_grad_scaler_unscale_before_step_is_refused() -> None:
    model = small_model().float()
    wrapped, optimizer = make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=1.0)
    scaler = torch.amp.GradScaler("cpu")
    x, y = batch()
    scaler.scale(F.cross_entropy(wrapped(x.float()), y)).backward()
    scaler.unscale_(optimizer)
    with pytest.raises(RuntimeError, match=r"unscale_\(optimizer\)"):
        scaler.step(optimizer)


def test_step_after_unwrapping_is_refused() -> None:
    model = small_model()
    wrapped, optimizer = make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=1.0)
    plain = wrapped.to_standard_module()
    x, y = batch()
    F.cross_entropy(plain(x), y).backward()
    with pytest.raises(RuntimeError, match="hooks are off.*plain torch optimizer"):
        optimizer.step()


@pytest.mark.parametrize("layer", [nn.EmbeddingBag(5, 3, mode="mean")])
def test_opacus_layers_whose_examples_are_not_rows_are_refused(layer: nn.Module) -> None:
    model = nn.Sequential(layer, nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"(?s)0 \(EmbeddingBag\)"):
        make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=1.0)
