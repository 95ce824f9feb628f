"""Gradient diagnostics: statistics against naive per-example loops, rank correlation, a tiny digits run."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from models import build
from naive import naive_per_example_grads
from rich.console import Console
from scipy.stats import spearmanr

from engm_opacus.diagnostics import (
    DiagnosticsConfig,
    average_ranks,
    gradient_stats,
    ratios_table,
    run_diagnostics,
    spearman,
)
from engm_opacus.losses.pgd_at import PGDAT


def attack(seed: int = 0) -> PGDAT:
    return PGDAT(eps=0.1, step_size=0.05, steps=2, generator=torch.Generator().manual_seed(seed))


def naive_stats(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Per-example norms, mean ||g_i - g_bar||^2 and per-example input-gradient norms, by explicit loops."""
    flat = torch.stack([torch.cat([g.flatten() for g in grads]) for grads in naive_per_example_grads(model, x, y)])
    centered = flat - flat.mean(dim=0)
    input_norms = []
    for i in range(len(x)):
        xi = x[i : i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xi), y[i : i + 1]), xi)
        input_norms.append(g.norm())
    return flat.norm(dim=1), float(centered.pow(2).sum(dim=1).mean()), torch.stack(input_norms)


def probe(seed: int = 3, batch: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, 4, 4, generator=generator, dtype=torch.float64), torch.randint(0, 5, (batch,), generator=generator)


@pytest.mark.parametrize("regime", ["NT", "AT"])
def test_gradient_stats_equal_naive_loops(regime: str) -> None:
    model = build("cnn")
    x, y = probe()
    x_measured = attack()(model, x, y).x_adv if regime == "AT" else x
    norms, trace, input_norms = naive_stats(model, x_measured, y)
    # Two batches: the statistics are over the whole probe set, whatever its batching.
    stats = gradient_stats(model, [(x[:4], y[:4]), (x[4:], y[4:])] if regime == "NT" else [(x, y)], regime, attack())
    torch.testing.assert_close(stats.param_norms, norms, rtol=1e-10, atol=0)
    torch.testing.assert_close(stats.input_norms, input_norms, rtol=1e-10, atol=0)
    assert stats.trace_covariance == pytest.approx(trace, rel=1e-10)
    assert stats.mean_grad_norm == pytest.approx(float(norms.mean()), rel=1e-12)
    assert stats.batch_mean_variance(4) == pytest.approx(trace / 4, rel=1e-10)


def test_spearman_matches_scipy_with_ties() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (40,), generator=generator).double()  # many ties
    y = x + torch.rand(40, generator=generator, dtype=torch.float64) * 3
    assert spearman(x, y) == pytest.approx(spearmanr(x.numpy(), y.numpy()).statistic, rel=1e-12)
    torch.testing.assert_close(average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])), torch.tensor([3.5, 1.0, 3.5, 2.0], dtype=torch.float64))


def test_tiny_digits_run_writes_csv_png_and_ratios(tmp_path: Path) -> None:
    config = DiagnosticsConfig(epochs=1, batch_size=16, max_train_examples=32, probe_size=16, pgd_steps=2, width=4)
    result = run_diagnostics(tmp_path, config)
    assert sorted(p.name for p in result.files) == sorted(
        ["summary.csv", "per_example.csv", "ratios.csv", "gradient_norm_variance.png", "norm_correlation.png", "weights.png"]
    )
    for path in result.files:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (tmp_path / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["regime"], r["epoch"]) for r in rows] == [("NT", "0"), ("NT", "1"), ("AT", "0"), ("AT", "1")]
    with (tmp_path / "per_example.csv").open() as handle:
        assert sum(1 for _ in csv.DictReader(handle)) == 2 * 2 * 16
    for ratio in result.ratios():
        nt, at = (next(r for r in rows if r["regime"] == g and int(r["epoch"]) == ratio["epoch"]) for g in ("NT", "AT"))
        assert ratio["norm_ratio"] == pytest.approx(float(at["mean_grad_norm"]) / float(nt["mean_grad_norm"]))
        assert ratio["variance_ratio"] == pytest.approx(float(at["trace_covariance"]) / float(nt["trace_covariance"]))
        assert -1 <= ratio["pearson_at"] <= 1 and -1 <= ratio["spearman_nt"] <= 1
    # Same initialization for both regimes: at epoch 0 the NT and AT models are identical, only the loss differs.
    assert rows[0]["mean_loss"] < rows[2]["mean_loss"]
    console = Console(record=True, width=140)
    console.print(ratios_table(result))
    assert "var AT/NT" in console.export_text()


@pytest.mark.parametrize(
    "kwargs, match",
    [({"epochs": -1}, "epochs"), ({"probe_size": 1}, "probe_size"), ({"gamma": 0.0}, "gamma"), ({"batch_size": 0}, "batch_size")],
)
def test_bad_config_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DiagnosticsConfig(**kwargs)
