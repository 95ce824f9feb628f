"""Gradient diagnostics: statistics against naive per-example loops, rank correlation, a tiny digits run."""

from __future__ import annotations

import csv
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr, spearmanr

from engm_opacus.at.attacks import pgd_linf
from engm_opacus.cli import main
from engm_opacus.experiments.diagnostics import DiagnosticsConfig, average_ranks, gradient_stats, pearson, spearman
from tests.helpers.naive import gamma_between, per_example_grads_loop
from tests.helpers.nets import groupnorm_cnn, images


def attack(seed: int = 0) -> partial:
    return partial(pgd_linf, eps=0.1, step_size=0.05, steps=2, generator=torch.Generator().manual_seed(seed))


def cross_entropy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def naive_stats(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Per-example norms, mean ||g_i - g_bar||^2 and per-example input-gradient norms, by explicit loops."""
    flat = torch.stack([torch.cat([g.flatten() for g in grads]) for grads in per_example_grads_loop(model, cross_entropy, x, y)])
    centered = flat - flat.mean(dim=0)
    input_norms = []
    for i in range(len(x)):
        xi = x[i : i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xi), y[i : i + 1]), xi)
        input_norms.append(g.norm())
    return flat.norm(dim=1), float(centered.pow(2).sum(dim=1).mean()), torch.stack(input_norms)


def probe(seed: int = 3, batch: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    return images(batch, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("regime", ["NT", "AT"])
def test_gradient_stats_equal_naive_loops(regime: str) -> None:
    model = groupnorm_cnn()
    x, y = probe()
    x_measured = attack()(model, x, y) if regime == "AT" else x
    norms, trace, input_norms = naive_stats(model, x_measured, y)
    gamma = gamma_between(norms)  # the floor is active for some examples only
    before = [p.detach().clone() for p in model.parameters()]
    # Two batches: the statistics are over the whole probe set, whatever its batching.
    stats = gradient_stats(model, [(x[:4], y[:4]), (x[4:], y[4:])] if regime == "NT" else [(x, y)], regime, attack(), gamma)
    assert all(torch.equal(a, b) and b.grad is None for a, b in zip(before, model.parameters()))  # measured on a copy
    torch.testing.assert_close(stats.param_norms, norms, rtol=1e-10, atol=0)
    torch.testing.assert_close(stats.input_norms, input_norms, rtol=1e-10, atol=0)
    torch.testing.assert_close(stats.weights, 1.0 / norms.clamp(min=gamma), rtol=1e-10, atol=0)
    assert stats.trace_covariance == pytest.approx(trace, rel=1e-10)
    assert stats.mean_grad_norm == pytest.approx(float(norms.mean()), rel=1e-12)
    assert stats.batch_mean_variance(4) == pytest.approx(trace / 4, rel=1e-10)


def test_spearman_matches_scipy_with_ties() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (40,), generator=generator).double()  # many ties
    y = x + torch.rand(40, generator=generator, dtype=torch.float64) * 3
    assert spearman(x, y) == pytest.approx(spearmanr(x.numpy(), y.numpy()).statistic, rel=1e-12)
    assert pearson(x, y) == pytest.approx(pearsonr(x.numpy(), y.numpy()).statistic, rel=1e-12)
    torch.testing.assert_close(average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])), torch.tensor([3.5, 1.0, 3.5, 2.0], dtype=torch.float64))


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_tiny_digits_run_through_the_cli_writes_csv_png_and_ratios(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # rich wraps at the terminal width
    argv = ["diagnose", "--out", str(tmp_path), "--epochs", "1", "--batch-size", "16", "--max-train-examples", "32",
            "--probe-size", "16", "--pgd-steps", "2", "--width", "4"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "var AT/NT" in printed and "Spearman AT" in printed
    files = ["summary.csv", "per_example.csv", "ratios.csv", "gradient_norm_variance.png", "norm_correlation.png", "weights.png"]
    for name in files:
        assert f"Wrote {tmp_path / name}" in printed
    for name in files[3:]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_csv(tmp_path / "summary.csv")
    assert [(r["regime"], r["epoch"]) for r in rows] == [("NT", "0"), ("NT", "1"), ("AT", "0"), ("AT", "1")]
    assert len(read_csv(tmp_path / "per_example.csv")) == 2 * 2 * 16
    for ratio in read_csv(tmp_path / "ratios.csv"):
        nt, at = (next(r for r in rows if r["regime"] == g and r["epoch"] == ratio["epoch"]) for g in ("NT", "AT"))
        assert float(ratio["norm_ratio"]) == pytest.approx(float(at["mean_grad_norm"]) / float(nt["mean_grad_norm"]))
        assert float(ratio["variance_ratio"]) == pytest.approx(float(at["trace_covariance"]) / float(nt["trace_covariance"]))
        assert float(ratio["pearson_at"]) == pytest.approx(float(at["pearson"]))
        assert float(ratio["spearman_nt"]) == pytest.approx(float(nt["spearman"]))
    for row in rows:
        assert float(row["batch_mean_variance"]) == pytest.approx(float(row["trace_covariance"]) / 16)
    # Same initialization for both regimes: at epoch 0 the models are identical, the adversarial loss is higher.
    assert float(rows[0]["mean_loss"]) < float(rows[2]["mean_loss"])


def test_cli_bad_input_exits_2_with_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["diagnose", "--out", str(tmp_path / "d"), "--eps", "8"]) == 2
    assert "eps=8/255" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    "kwargs, match",
    [({"epochs": -1}, "epochs"), ({"probe_size": 1}, "probe_size"), ({"gamma": 0.0}, "gamma"), ({"batch_size": 0}, "batch_size")],
)
def test_bad_config_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DiagnosticsConfig(**kwargs)
