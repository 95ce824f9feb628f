"""The ENGM-vs-MSGD benchmark on a minimal budget: every column, values in range, reuse, resume, CLI options."""

from __future__ import annotations

import argparse
import csv
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import engm_opacus.experiments.benchmark as benchmark
from engm_opacus.cli.bench import add_arguments, bench_config_from_args
from engm_opacus.experiments.benchmark import OPTIMIZER_CHOICES, BenchConfig, plan, run_benchmark, run_name
from engm_opacus.experiments.benchmark_report import METRICS, SUMMARY_COLUMNS
from engm_opacus.training.config import DEFAULT_LR, TrainConfig

# eps 0.3 makes every attack succeed at once, so AutoAttack (run on 4 examples) stops after its first attack.
TINY = TrainConfig(
    epochs=1, batch_size=16, max_train_examples=32, max_val_examples=8, max_test_examples=8,
    eps=0.3, step_size=0.1, pgd_steps=3, val_pgd_steps=3, test_pgd_steps=3, device="cpu", progress=False,
)


@pytest.fixture(scope="module")
def minimal(tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)
    bench = BenchConfig(
        methods=("pgd-at",), optimizers=OPTIMIZER_CHOICES, seeds=(0,), lr_multipliers=(1.0, 2.0), wd_multipliers=(),
        gamma_multipliers=(1.0, 4.0), autoattack_examples=4, jobs=1, out_dir=str(tmp_path_factory.mktemp("bench")), base=TINY,
    )
    return bench, run_benchmark(bench)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_main_table_has_every_column_with_values_in_range(minimal):
    bench, _ = minimal
    out = Path(bench.out_dir)
    with open(out / "main.csv", newline="") as handle:
        assert tuple(next(csv.reader(handle))) == SUMMARY_COLUMNS
    main = [r for r in read_csv(out / "main.csv") if r["part"] == "main"]
    assert [r["optimizer"] for r in main] == list(OPTIMIZER_CHOICES)
    for row in main:
        assert row["seeds"] == "1" and row["autoattack_runs"] == "1"
        for key in ("clean_last", "pgd20_last", "aa_last", "clean_best", "pgd20_best", "aa_best"):
            assert 0.0 <= float(row[f"{key}_mean"]) <= 1.0, key
            assert float(row[f"{key}_std"]) == 0.0  # one seed
        # AutoAttack is at least as strong as nothing: it never exceeds clean accuracy.
        assert float(row["aa_last_mean"]) <= float(row["clean_last_mean"])
        # One epoch: the best checkpoint is the last one, so the overfitting gap is exactly 0.
        assert float(row["best_epoch_mean"]) == 1.0 and float(row["gap_pgd20_mean"]) == 0.0
        assert float(row["time_s_mean"]) > 0.0
        expected_lr = DEFAULT_LR[row["optimizer"]]
        assert float(row["lr"]) == pytest.approx(expected_lr)
        assert (row["gamma"] == "") == (row["optimizer"] == "msgd")
    text = (out / "results.md").read_text()
    for _, title in METRICS:
        assert title in text
    for name in ("| MSGD |", "| ENGM |", "| ENGM (input-norm) |"):  # one name per optimizer in the tables
        assert name in text
    for name in ("runs.csv", "sensitivity.csv", "robust_over_epochs.png", "sweeps.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "sweeps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_and_sweeps_follow_the_plan(minimal):
    bench, result = minimal
    rows = result["rows"]
    assert len(rows) == len(plan(bench)) == 3 + 2 * 2 + 2
    assert len({run_name(spec) for spec in plan(bench)}) == 6  # the x1 sweep points reuse the main runs
    runs = read_csv(Path(bench.out_dir) / "runs.csv")
    assert len(runs) == len(rows)
    lr_sweep = {(r["optimizer"], float(r["lr"])) for r in runs if r["part"] == "sensitivity-lr"}
    assert lr_sweep == {("msgd", 0.1), ("msgd", 0.2), ("engm", 0.5), ("engm", 1.0)}
    assert sorted(float(r["gamma"]) for r in runs if r["part"] == "gamma") == [1.0, 4.0]
    for spread in result["sensitivity"]:
        a, b = (r["pgd20_last_mean"] for r in result["summary"] if r["part"] == "sensitivity-lr" and r["optimizer"] == spread["optimizer"])
        assert spread["spread"] == pytest.approx(abs(a - b))
        assert spread["std"] == pytest.approx(abs(a - b) / math.sqrt(2))


def test_rerun_reuses_finished_runs_without_training(minimal, monkeypatch):
    bench, result = minimal

    def no_training(config):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(benchmark, "train", no_training)
    again = run_benchmark(bench)
    assert all(row["reused"] for row in again["rows"])
    assert [r["pgd20_last"] for r in again["rows"]] == [r["pgd20_last"] for r in result["rows"]]


def test_interrupted_run_resumes_from_its_checkpoint(minimal):
    bench, result = minimal
    spec = plan(bench)[0]
    run_dir = Path(bench.out_dir) / "runs" / run_name(spec)
    history = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "bench.json").unlink()
    (run_dir / "result.json").unlink()  # as if killed after the last epoch's checkpoint
    row = benchmark.run_one(spec, str(Path(bench.out_dir) / "runs"))
    assert not row["reused"]
    assert json.loads((run_dir / "metrics.json").read_text()) == history  # no epoch was trained again
    for key in ("clean_last", "pgd20_last", "aa_last", "time_s"):
        assert row[key] == result["rows"][0][key]


def test_bad_configs_name_the_fix():
    with pytest.raises(ValueError, match="Fix: use some of"):
        BenchConfig(methods=("fgsm",), base=TINY).validate()
    with pytest.raises(ValueError, match="engm-input-norm"):
        BenchConfig(optimizers=("adam",), base=TINY).validate()
    with pytest.raises(ValueError, match="--seeds 0 1 2"):
        BenchConfig(seeds=(0, 0), base=TINY).validate()
    with pytest.raises(ValueError, match="positive"):
        BenchConfig(lr_multipliers=(0.0,), base=TINY).validate()
    with pytest.raises(ValueError, match="0 turns AutoAttack off"):
        BenchConfig(autoattack_examples=-1, base=TINY).validate()
    with pytest.raises(ValueError, match="epochs"):
        BenchConfig(base=replace(TINY, epochs=0)).validate()


def test_cli_options_map_onto_the_quick_budget():
    parser = add_arguments(argparse.ArgumentParser())
    quick = bench_config_from_args(parser.parse_args(["--quick"]))
    assert quick.quick and quick.base.epochs == 4 and quick.base.max_train_examples == 640 and quick.autoattack_seeds == 1
    assert quick.base.lr is None  # each optimizer at its own DEFAULT_LR
    custom = bench_config_from_args(parser.parse_args(
        ["--quick", "--methods", "mart", "--seeds", "3", "4", "--epochs", "2", "--wd-multipliers", "--lr-engm", "0.3"]
    ))
    assert custom.methods == ("mart",) and custom.seeds == (3, 4) and custom.base.epochs == 2
    assert custom.wd_multipliers == () and custom.lr_multipliers == (0.5, 1.0, 2.0) and custom.lr_engm == 0.3
    full_cifar = bench_config_from_args(parser.parse_args(["--dataset", "cifar10", "--data-dir", "/data"]))
    assert not full_cifar.quick and full_cifar.base.model == "preact-resnet18" and full_cifar.base.data_dir == "/data"
