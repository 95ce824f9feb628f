"""evaluate: clean/PGD/AutoAttack (pyautoattack) accuracy against the analytic robust accuracy of a linear model; state left intact."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

from engm_opacus import make_engm
from engm_opacus.training.evaluation import autoattack_settings, evaluate, make_autoattack, run_autoattack
from engm_opacus.training.extras import MissingExtraError
from tests.helpers.nets import groupnorm_cnn, images

EPS = 0.05


def linear_problem(n: int, seed: int = 0, eps: float = EPS) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits ``[0, <w, x> + b, -100, -100]`` on ``x`` in ``[0,1]^16`` labelled by the model (clean accuracy 1).

    Classes 2 and 3 never win; they are there because AutoAttack's APGD-T needs 4 classes.

    Returns the model, data and which examples are robust, analytically: the worst case in the eps-ball
    and ``[0, 1]`` moves every pixel by ``eps`` against ``sign(w)`` for class 1, along it for class 0.
    """
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4)).double()
    w = torch.randn(16, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[1] = w
        model[1].bias.copy_(torch.tensor([0.0, -float(w.sum()) / 2, -100.0, -100.0], dtype=torch.float64))
    x = torch.rand(n, 1, 4, 4, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        score = model(x)[:, 1]
        y = (score > 0).long()
        direction = torch.where(y == 1, -1.0, 1.0).view(-1, 1, 1, 1).to(x) * torch.sign(w).view(1, 1, 4, 4)
        worst = model(torch.clamp(x + eps * direction, 0.0, 1.0))[:, 1]
    return model, x, y, (worst > 0).long() == y


def test_pgd_reaches_analytic_robust_accuracy_on_wrapped_model_and_leaves_it_intact() -> None:
    model, x, y, robust_flags = linear_problem(24)
    robust = float(robust_flags.double().mean())
    assert 0.2 < robust < 0.9
    wrapped, _ = make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=1.0)
    wrapped.train()
    result = evaluate(wrapped, [(x[:16], y[:16]), (x[16:], y[16:])], eps=EPS, pgd_steps=10, step_size=0.02)
    assert result == {"clean_acc": 1.0, "pgd_acc": robust, "autoattack_acc": None, "n_examples": 24}
    assert wrapped.training and wrapped.hooks_enabled
    for p in model.parameters():
        assert p.requires_grad and p.grad is None and getattr(p, "grad_sample", None) is None


def test_evaluation_between_training_steps_leaves_the_next_engm_step_unchanged() -> None:
    """An evaluation (PGD, forwards and backwards through the wrapped model) records nothing a step would use."""
    x, y = images(8, torch.Generator().manual_seed(4))
    models = [groupnorm_cnn(), groupnorm_cnn()]
    steps = []
    for evaluated, model in enumerate(models):
        wrapped, optimizer = make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), gamma=0.05)
        if evaluated:
            evaluate(wrapped, [(x, y)], eps=0.1, pgd_steps=3, step_size=0.05)
        nn.functional.cross_entropy(wrapped(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        steps.append(copy.deepcopy(optimizer.last_step))
    torch.testing.assert_close(steps[1].per_example_norms, steps[0].per_example_norms, rtol=0, atol=0)
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)


def test_autoattack_breaks_every_example_when_none_is_robust() -> None:
    """At eps=0.5 no example of the linear model is robust; APGD-CE must find all (Square is then skipped)."""
    model, x, y, robust_flags = linear_problem(24, eps=0.5)
    assert not bool(robust_flags.any())
    wrapped, _ = make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1), gamma=1.0)
    wrapped.train()
    result = evaluate(wrapped, [(x, y)], eps=0.5, pgd_steps=10, step_size=0.1, autoattack=True)
    assert result == {"clean_acc": 1.0, "pgd_acc": 0.0, "autoattack_acc": 0.0, "n_examples": 24}
    assert wrapped.training and wrapped.hooks_enabled
    for p in model.parameters():
        assert p.requires_grad and p.grad is None and getattr(p, "grad_sample", None) is None


def test_autoattack_examples_stay_in_the_eps_ball_and_keep_the_dtype() -> None:
    model, x, y, _ = linear_problem(24, eps=0.5)
    model.eval()
    with torch.no_grad():
        x_auto = run_autoattack(model, x, y, eps=0.3, n_classes=4, seed=0)
        assert x_auto.dtype == torch.float64
        assert float((x_auto - x).abs().max()) <= 0.3 * (1 + 1e-12) and 0.0 <= float(x_auto.min()) and float(x_auto.max()) <= 1.0
        assert not bool((model(x_auto).argmax(1) == y).any())


def test_pgd_accuracy_over_batches_is_analytic_and_max_examples_truncates() -> None:
    model, x, y, robust_flags = linear_problem(30, seed=1)
    loader = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 30, 8)]
    robust_first_9 = float(robust_flags[:9].double().mean())
    assert robust_first_9 != float(robust_flags.double().mean())
    result = evaluate(model, loader, eps=EPS, pgd_steps=10, step_size=0.02, max_examples=9)
    assert result == {"clean_acc": 1.0, "pgd_acc": robust_first_9, "autoattack_acc": None, "n_examples": 9}


def test_robust_accuracy_at_most_clean_accuracy_on_a_cnn() -> None:
    model = groupnorm_cnn()
    x, y = images(40, torch.Generator().manual_seed(2))
    model.train()
    result = evaluate(model, [(x[:20], y[:20]), (x[20:], y[20:])], eps=0.2, pgd_steps=5, step_size=0.05)
    assert model.training
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).double().mean())
    assert result["clean_acc"] == clean
    assert result["pgd_acc"] <= result["clean_acc"]
    assert result["pgd_acc"] < clean  # the attack does break some examples at eps=0.2
    assert model.training


def test_zero_eps_gives_clean_accuracy() -> None:
    model = groupnorm_cnn()
    x, y = images(16, torch.Generator().manual_seed(3))
    result = evaluate(model, [(x, y)], eps=0.0, pgd_steps=3)
    assert result["pgd_acc"] == result["clean_acc"]


@pytest.mark.parametrize(
    "kwargs, loader, match",
    [
        ({"eps": 2.0}, None, r"eps must be a number in \[0, 1\].*8/255"),
        ({"pgd_steps": -1}, None, r"steps must be an int >= 0"),
        ({"max_examples": 0}, None, r"max_examples must be a positive int"),
        ({}, [], r"no examples.*non-empty batch"),
        ({"autoattack": True}, "three classes", r"AutoAttack.*at least 4 classes, got 3.*autoattack=False"),
    ],
)
def test_bad_arguments_name_the_fix(kwargs: dict, loader: object, match: str) -> None:
    x, y = images(4, torch.Generator().manual_seed(0))
    model = groupnorm_cnn()  # three classes
    if loader == "three classes":
        loader = [(x, y)]
    with pytest.raises(ValueError, match=match):
        evaluate(model, [(x, y)] if loader is None else loader, **kwargs)


STANDARD = {
    "version": "standard", "attacks": ["apgd-ce", "apgd-t", "fab-t", "square"], "norm": "Linf",
    "apgd_iterations": 100, "apgd_restarts": 1, "apgd_t_iterations": 100, "fab_iterations": 100,
    "square_queries": 5000, "eot_iterations": 1,
}
"""The published settings of AutoAttack "standard" (Croce & Hein 2020) under L-infinity."""


@pytest.fixture
def adversaries(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every ``pyautoattack.AutoAttack`` whose ``run_standard_evaluation`` runs, recorded (the call goes through)."""
    pyautoattack = pytest.importorskip("pyautoattack")
    seen = []
    original = pyautoattack.AutoAttack.run_standard_evaluation

    def spy(self, x, y, **kwargs):
        seen.append(self)
        return original(self, x, y, **kwargs)

    monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation", spy)
    return seen


def test_autoattack_standard_through_pyautoattack_finds_exactly_the_non_robust_examples(adversaries: list) -> None:
    """A tiny linear model, 12 examples: AutoAttack accuracy is the analytic robust accuracy, with the standard settings."""
    model, x, y, robust_flags = linear_problem(12)
    robust = float(robust_flags.double().mean())
    assert 0.2 < robust < 0.9
    result = evaluate(model, [(x[:8], y[:8]), (x[8:], y[8:])], eps=EPS, pgd_steps=10, step_size=0.02, autoattack=True)
    assert result["autoattack_acc"] == robust and result["clean_acc"] == 1.0
    assert len(adversaries) == 2  # one run per batch
    for adversary in adversaries:
        settings = autoattack_settings(adversary)
        assert {k: settings[k] for k in STANDARD} == STANDARD and settings["eps"] == EPS
        assert settings["apgd_t_target_classes"] == settings["fab_target_classes"] == 3  # 4 classes: every other class
        assert settings["package"].startswith("pyautoattack ")


def test_standard_settings_on_ten_classes_are_the_published_ones() -> None:
    pytest.importorskip("pyautoattack")
    adversary = make_autoattack(nn.Identity(), eps=8 / 255, n_classes=10)
    settings = autoattack_settings(adversary)
    assert {k: settings[k] for k in STANDARD} == STANDARD
    assert settings["eps"] == 8 / 255 and settings["apgd_t_target_classes"] == settings["fab_target_classes"] == 9


def test_custom_version_runs_only_the_attacks_given(adversaries: list) -> None:
    model, x, y, robust_flags = linear_problem(8)
    result = evaluate(model, [(x, y)], eps=EPS, pgd_steps=5, step_size=0.02, autoattack=True,
                      autoattack_version="custom", autoattack_attacks=["apgd-ce"])
    assert result["autoattack_acc"] == float(robust_flags.double().mean())
    (adversary,) = adversaries
    assert adversary.version == "custom" and adversary.attacks_to_run == ["apgd-ce"]


@pytest.mark.parametrize(
    "version, attacks, match",
    [
        ("strong", None, r"version must be one of standard, plus, rand, custom"),
        ("standard", ["apgd-ce"], r"chosen by version 'standard'.*version='custom'"),
        ("custom", None, r"'custom' needs attacks"),
        ("custom", ["pgd"], r"'custom' needs attacks from apgd-ce"),
    ],
)
def test_bad_autoattack_version_or_attacks_name_the_fix(version: str, attacks: object, match: str) -> None:
    model, x, y, _ = linear_problem(4)
    with pytest.raises(ValueError, match=match):
        evaluate(model, [(x, y)], autoattack=True, autoattack_version=version, autoattack_attacks=attacks)


def test_autoattack_without_the_eval_extra_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """``pyautoattack`` not installed (simulated: ``None`` in ``sys.modules`` makes its import fail)."""
    monkeypatch.setitem(sys.modules, "pyautoattack", None)
    model, x, y, _ = linear_problem(4)
    with pytest.raises(MissingExtraError, match=r"AutoAttack needs the optional package 'pyautoattack'.*pip install 'engm-opacus\[eval\]'"):
        evaluate(model, [(x, y)], autoattack=True)
    assert evaluate(model, [(x, y)], pgd_steps=1)["autoattack_acc"] is None  # without AutoAttack nothing is needed
