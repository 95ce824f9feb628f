"""The benchmark's decisions without training: collapse rule, lr selection, gamma verdict, paired tests, configs and CLI."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from dataclasses import replace

import numpy as np
import pytest
from scipy.stats import ttest_rel

import engm_opacus.experiments.bench_runs as bench_runs
from engm_opacus.cli.bench import add_arguments, bench_config_from_args
from engm_opacus.experiments.bench_runs import RunSpec, run_name
from engm_opacus.experiments.bench_select import (
    COLLAPSE_FACTOR, collapse_threshold, gamma_verdict, is_collapsed, paired_test, select_lrs, sign_flip_test,
)
from engm_opacus.experiments.benchmark import BenchConfig, estimate_text, plan_sizes
from engm_opacus.training.config import TrainConfig

NAN = float("nan")


def tuning_row(optimizer: str, lr: float, val: float, collapsed: bool = False, **test: float) -> dict:
    return {"eps": 0.2, "method": "pgd-at", "optimizer": optimizer, "lr": lr, "val_pgd_best": val, "collapsed": collapsed, **test}


def test_collapse_rule_is_near_chance_or_non_finite():
    assert COLLAPSE_FACTOR == 1.5 and collapse_threshold(10) == pytest.approx(0.15)
    ok = [{"train_loss": 2.0, "val_clean_acc": 0.1}, {"train_loss": 1.0, "val_clean_acc": 0.16}]
    assert not is_collapsed(ok, 10)
    assert is_collapsed(ok[:1], 10)  # final val clean 10% <= 15%
    assert is_collapsed([{"train_loss": 2.0, "val_clean_acc": 0.15}], 10)  # the boundary counts as collapsed
    assert is_collapsed([{"train_loss": NAN, "val_clean_acc": 0.9}, ok[1]], 10)  # a non-finite loss in any epoch
    assert is_collapsed([{"train_loss": math.inf, "val_clean_acc": 0.9}], 10)
    assert is_collapsed([], 10)
    assert not is_collapsed([{"train_loss": 1.0, "val_clean_acc": 0.02}], 100)  # 1.5/100 on 100 classes


def test_selection_is_argmax_of_validation_with_ties_to_the_smaller_lr():
    rows = [
        tuning_row("msgd", 0.01, 0.30), tuning_row("msgd", 0.05, 0.35), tuning_row("msgd", 0.02, 0.35), tuning_row("msgd", 0.1, 0.9, collapsed=True),
        tuning_row("engm", 0.5, 0.37), tuning_row("engm", 1.0, NAN), tuning_row("engm", 2.0, 0.1),
        tuning_row("engm-input-norm", 0.5, 0.2, collapsed=True), tuning_row("engm-input-norm", 1.0, 0.3, collapsed=True),
    ]
    assert select_lrs(rows) == {(0.2, "pgd-at", "msgd"): 0.02, (0.2, "pgd-at", "engm"): 0.5, (0.2, "pgd-at", "engm-input-norm"): None}


def test_selection_never_reads_test_numbers():
    rng = np.random.default_rng(0)
    rows = [tuning_row(o, lr, float(rng.uniform())) for o in ("msgd", "engm") for lr in (0.1, 0.2, 0.5)]
    clean = select_lrs(rows)
    poisoned = [{**r, **{k: NAN for k in ("clean_last", "pgd20_last", "aa_last", "pgd20_best", "aa_best")}} for r in rows]
    flipped = [{**r, "pgd20_last": 1.0 - r["val_pgd_best"], "pgd20_best": 1.0 - r["val_pgd_best"]} for r in rows]
    assert select_lrs(poisoned) == select_lrs(flipped) == clean


def gamma_rows(gamma, vals, tests):
    return [{"gamma": gamma, "val_pgd_best": v, "pgd20_last": t} for v, t in zip(vals, tests)]


def test_tuned_gamma_is_chosen_on_validation():
    rows = gamma_rows(0.25, [0.30, 0.32], [0.50, 0.50]) + gamma_rows(1.0, [0.36, 0.38], [0.30, 0.34]) + gamma_rows(4.0, [0.2, 0.2], [0.9, 0.9])
    std = float(np.std([0.30, 0.34], ddof=1))
    verdict = gamma_verdict(rows)
    assert verdict["tuned_gamma"] == 1.0 and verdict["tuned_val"] == pytest.approx(0.37)  # validation, although 4.0 tests best
    assert verdict["tuned_test_mean"] == pytest.approx(0.32) and verdict["tuned_test_std"] == pytest.approx(std)
    tie = gamma_verdict(gamma_rows(4.0, [0.3], [0.1]) + gamma_rows(0.25, [0.3], [0.2]))
    assert tie["tuned_gamma"] == 0.25


def test_paired_test_matches_scipy_and_the_sign_flip_fallback_matches_enumeration(monkeypatch):
    a, b = [0.40, 0.36, 0.38, 0.41, 0.35], [0.35, 0.36, 0.33, 0.37, 0.36]
    result = paired_test(a, b)
    assert result["n"] == 5 and result["test"] == "paired t"
    assert result["mean_diff"] == pytest.approx(np.mean(np.subtract(a, b)))
    assert result["p_value"] == pytest.approx(ttest_rel(a, b).pvalue)
    d = np.subtract(a, b)
    flips = [abs(np.mean(np.multiply(s, d))) for s in itertools.product((1, -1), repeat=5)]
    expected = np.mean([f >= abs(d.mean()) - 1e-12 for f in flips])
    assert sign_flip_test(d) == pytest.approx(expected)
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # as if scipy were not installed
    fallback = paired_test(a, b)
    assert fallback["test"] == "sign-flip" and fallback["p_value"] == pytest.approx(expected)
    assert paired_test([0.5, NAN], [0.4, 0.3]) == {"n": 1, "mean_diff": pytest.approx(0.1), "p_value": pytest.approx(NAN, nan_ok=True), "test": "-"}


def test_a_run_whose_optimizer_raises_on_non_finite_values_is_a_collapsed_row(tmp_path, monkeypatch):
    def diverging(config):
        raise FloatingPointError("non-finite per-example gradient norms")

    monkeypatch.setattr(bench_runs, "train", diverging)
    spec = RunSpec("final", replace(TrainConfig(), optimizer="engm", lr=2.0, eps=0.2, step_size=0.05), 4)
    row = bench_runs.run_one(spec, str(tmp_path))
    assert row["collapsed"] and "FloatingPointError" in row["error"] and math.isnan(row["pgd20_last"]) and math.isnan(row["aa_best"])
    stored = json.loads((tmp_path / run_name(spec) / "bench.json").read_text())
    assert stored["row"]["error"] == row["error"]
    assert bench_runs.run_one(spec, str(tmp_path))["reused"]  # not retried on the next invocation


def test_run_names_hold_the_phase_and_the_gamma():
    config = replace(TrainConfig(), optimizer="engm", lr=0.5, eps=0.2, seed=3)
    assert run_name(RunSpec("final", config)).startswith("final-eps0.2-pgd-at-engm-lr0.5-g1-s3-")
    assert run_name(RunSpec("gamma", replace(config, gamma=0.25))).startswith("gamma-eps0.2-pgd-at-engm-lr0.5-g0.25-s3-")
    assert "-g--" in run_name(RunSpec("tune", replace(config, optimizer="msgd")))
    assert run_name(RunSpec("gamma", replace(config, gamma=4.0))) != run_name(RunSpec("gamma", replace(config, gamma=0.25)))


def test_bad_configs_name_the_fix():
    tiny = TrainConfig(epochs=1)
    with pytest.raises(ValueError, match="Fix: use some of"):
        BenchConfig(methods=("fgsm",), gamma_study=(), base=tiny).validate()
    with pytest.raises(ValueError, match="engm-input-norm"):
        BenchConfig(optimizers=("adam",), gamma_study=(), base=tiny).validate()
    with pytest.raises(ValueError, match="distinct one"):
        BenchConfig(tuning_seed=0, gamma_study=(), base=tiny).validate()
    with pytest.raises(ValueError, match="lr_grid_msgd"):
        BenchConfig(lr_grid_msgd=(0.1, -1.0), gamma_study=(), base=tiny).validate()
    with pytest.raises(ValueError, match="autoattack_examples"):
        BenchConfig(autoattack_examples=-1, gamma_study=(), base=tiny).validate()
    with pytest.raises(ValueError, match="epochs"):
        BenchConfig(gamma_study=(), base=replace(tiny, epochs=0)).validate()


def test_cli_refuses_unknown_names_listing_the_valid_ones(capsys):
    parser = add_arguments(argparse.ArgumentParser())
    with pytest.raises(SystemExit):
        parser.parse_args(["--optimizers", "adam"])
    assert "msgd" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--methods", "fgsm"])
    assert "awp-pgd-at" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--gamma-study", "big"])
    assert "expected a number" in capsys.readouterr().err


def test_cli_defaults_are_the_full_protocol_and_quick_is_small():
    parser = add_arguments(argparse.ArgumentParser())
    full = bench_config_from_args(parser.parse_args([]))
    assert tuple(full.eps) == (0.2,) and full.base.epochs == 20 and full.base.batch_size == 64 and full.base.schedule == "piecewise"
    assert full.base.pgd_steps == 10 and full.base.test_pgd_steps == 20 and full.autoattack_examples == 100 and full.jobs == 2
    assert tuple(full.seeds) == (0, 1, 2, 3, 4) and full.tuning_seed == 1000 and tuple(full.gamma_study) == (0.25, 4.0)
    assert plan_sizes(full) == {"tune": 4 * 3 * 5, "final": 4 * 3 * 5, "gamma": 2 * 5}
    estimate = estimate_text(full, plan_sizes(full), 1257, 180, 360)
    assert "60 tuning runs" in estimate and "130 runs in all" in estimate and "120 evaluations (last and best) on 100 test examples" in estimate
    quick = bench_config_from_args(parser.parse_args(["--quick"]))
    assert quick.quick and quick.base.epochs == 2 and len(quick.seeds) == 2 and len(quick.lr_grid_engm) == 2 and quick.autoattack_examples == 8
    custom = bench_config_from_args(parser.parse_args(
        ["--quick", "--eps", "0.2", "0.3", "--methods", "mart", "--seeds", "3", "4", "--gamma-study", "0.5", "2", "--lr-grid-msgd", "0.1"]
    ))
    assert custom.eps == (0.2, 0.3) and custom.methods == ("mart",) and custom.seeds == (3, 4) and custom.gamma_study == (0.5, 2.0)
    assert custom.lr_grid_msgd == (0.1,) and plan_sizes(custom) == {"tune": 2 * (1 + 2 + 2), "final": 2 * 3 * 2, "gamma": 0}
    none = bench_config_from_args(parser.parse_args(["--gamma-study"]))
    assert none.gamma_study == ()
    cifar = bench_config_from_args(parser.parse_args(["--dataset", "cifar10", "--data-dir", "/data"]))
    assert cifar.base.model == "preact-resnet18" and cifar.base.data_dir == "/data"
