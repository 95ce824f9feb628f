"""The ENGM-vs-MSGD benchmark on a minimal budget: tuning on validation then seeds on test, every column, paired tests, reuse, resume."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import ttest_rel

import engm_opacus.experiments.bench_runs as bench_runs
from engm_opacus.experiments.bench_runs import RunSpec, run_name
from engm_opacus.experiments.bench_select import select_lrs
from engm_opacus.experiments.bench_tables import GAMMA_COLUMNS, MAIN_COLUMNS, METRICS, PAIRED_COLUMNS, RUN_COLUMNS, TUNING_COLUMNS
from engm_opacus.experiments.benchmark import OPTIMIZER_CHOICES, BenchConfig, final_configs, run_benchmark, tuning_configs
from engm_opacus.training.config import TrainConfig

TINY = TrainConfig(
    epochs=1, batch_size=16, max_train_examples=48, max_val_examples=16, max_test_examples=16,
    pgd_steps=1, val_pgd_steps=1, test_pgd_steps=2, device="cpu", progress=False,
)
TEST_KEYS = ("clean_last", "pgd20_last", "aa_last", "clean_best", "pgd20_best", "aa_best", "gap_pgd20")


@pytest.fixture(scope="module")
def minimal(tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)
    bench = BenchConfig(
        eps=(0.05,), methods=("pgd-at",), lr_grid_msgd=(0.05, 0.1), lr_grid_engm=(0.5, 1.0), seeds=(0, 1, 2), gamma_study=(4.0,),
        autoattack_examples=2, jobs=1, out_dir=str(tmp_path_factory.mktemp("bench")), base=TINY,
    )
    return bench, run_benchmark(bench)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def header(path: Path) -> tuple:
    with open(path, newline="") as handle:
        return tuple(next(csv.reader(handle)))


def test_main_table_has_every_column_with_values_in_range(minimal):
    bench, result = minimal
    out = Path(bench.out_dir)
    assert header(out / "main.csv") == MAIN_COLUMNS
    main = read_csv(out / "main.csv")
    assert [r["optimizer"] for r in main] == list(OPTIMIZER_CHOICES)
    for row in main:
        assert row["seeds"] == "3" and float(row["eps"]) == 0.05 and 0.0 <= float(row["diverged_share"]) <= 1.0
        assert float(row["lr"]) == result["selected"][(0.05, "pgd-at", row["optimizer"])]
        for key in ("clean_last", "pgd20_last", "aa_last", "clean_best", "pgd20_best", "aa_best"):
            assert 0.0 <= float(row[f"{key}_mean"]) <= 1.0, key
            assert float(row[f"{key}_std"]) >= 0.0, key
        assert float(row["gap_pgd20_mean"]) == pytest.approx(float(row["pgd20_best_mean"]) - float(row["pgd20_last_mean"]))
        assert float(row["best_epoch_mean"]) == 1.0 and float(row["time_s_mean"]) > 0.0
        assert (row["gamma"] == "") == (row["optimizer"] == "msgd")
    for name, columns in (("tuning.csv", TUNING_COLUMNS), ("runs.csv", RUN_COLUMNS), ("paired.csv", PAIRED_COLUMNS), ("gamma.csv", GAMMA_COLUMNS)):
        assert header(out / name) == columns, name
    text = (out / "results.md").read_text()
    for title in [t for _, t in METRICS] + ["Paired tests", "Tuning on validation", "Sensitivity", "Gamma study", "tuned gamma"]:
        assert title in text
    for name in ("| MSGD |", "| ENGM |", "| ENGM (input-norm) |"):
        assert name in text
    for name in ("robust_over_epochs.png", "sensitivity.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tuning_then_seeds_structure_and_selection_on_validation(minimal):
    bench, result = minimal
    tuning, final, gamma = result["tuning"], result["final"], result["gamma"]
    assert len(tuning) == 2 * 3 and {r["seed"] for r in tuning} == {1000} and {r["phase"] for r in tuning} == {"tune"}
    assert not any(key in row for row in tuning for key in TEST_KEYS)  # tuning rows carry no test number at all
    assert len(final) == 3 * 3 and sorted({r["seed"] for r in final}) == [0, 1, 2]
    assert len(gamma) == 3 and {r["gamma"] for r in gamma} == {4.0} and {r["lr"] for r in gamma} == {result["selected"][(0.05, "pgd-at", "engm")]}
    for optimizer in OPTIMIZER_CHOICES:
        eligible = [r for r in tuning if r["optimizer"] == optimizer and not r["collapsed"]]
        expected = max(eligible, key=lambda r: (r["val_pgd_best"], -r["lr"]))["lr"] if eligible else None
        assert result["selected"][(0.05, "pgd-at", optimizer)] == expected
        assert {r["lr"] for r in final if r["optimizer"] == optimizer} == ({expected} if expected else set())
    for row in tuning:
        assert row["val_pgd_best"] == max(row["val_pgd_history"])
    sizes = [len(r["val_pgd_history"]) for r in tuning + final]
    assert sizes == [1] * len(sizes)


def test_tuning_test_numbers_are_never_read(minimal):
    """Poison the tuning runs' stored test numbers: re-reading them gives the same rows and selection."""
    bench, result = minimal
    runs = Path(bench.out_dir) / "runs"
    specs = [RunSpec("tune", config, 0) for config in tuning_configs(bench)]
    for spec in specs:
        run_dir = runs / run_name(spec)
        stored = json.loads((run_dir / "result.json").read_text())
        assert stored["test_last"]["n_examples"] == 1  # the loop always tests; tuning runs cap it at one example
        for key in ("test_last", "test_best"):
            stored[key] = {k: float("nan") for k in stored[key]}
        (run_dir / "result.json").write_text(json.dumps(stored))
        (run_dir / "bench.json").unlink()
    again = [bench_runs.run_one(spec, str(runs)) for spec in specs]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "reused"} for r in rows]  # noqa: E731
    assert json.dumps(strip(again)) == json.dumps(strip(result["tuning"]))  # (NaN != NaN as floats)
    assert select_lrs(again) == result["selected"]


def test_paired_tests_match_an_independent_computation(minimal):
    bench, result = minimal
    runs = [r for r in read_csv(Path(bench.out_dir) / "runs.csv") if r["phase"] == "final"]
    paired = read_csv(Path(bench.out_dir) / "paired.csv")
    assert len(paired) == 2 * 2
    for row in paired:
        def values(optimizer: str) -> np.ndarray:
            return np.array([float(r[row["metric"]]) for r in sorted(runs, key=lambda r: int(r["seed"])) if r["optimizer"] == optimizer])

        a, b = values(row["optimizer"]), values("msgd")
        assert row["baseline"] == "msgd" and int(row["n"]) == 3 and row["test"] == "paired t"
        assert float(row["mean_diff"]) == pytest.approx(float(np.mean(a - b)), abs=1e-12)
        expected = float(ttest_rel(a, b).pvalue)
        if math.isnan(expected):
            assert row["p_value"] == ""
        else:
            assert float(row["p_value"]) == pytest.approx(expected)


def test_rerun_trains_and_attacks_nothing(minimal, monkeypatch):
    bench, result = minimal

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished run was computed again")

    monkeypatch.setattr(bench_runs, "train", forbidden)
    monkeypatch.setattr(bench_runs, "autoattack_eval", forbidden)
    again = run_benchmark(bench)
    assert all(row["reused"] for row in again["tuning"] + again["final"] + again["gamma"])
    assert [r["pgd20_last"] for r in again["final"]] == [r["pgd20_last"] for r in result["final"]]
    assert again["selected"] == result["selected"]


def test_interrupted_run_resumes_from_its_checkpoint(minimal):
    bench, result = minimal
    row = result["final"][0]
    spec = RunSpec("final", final_configs(bench, result["selected"])[0], bench.autoattack_examples)
    assert (spec.config.optimizer, spec.config.seed, spec.config.lr) == (row["optimizer"], row["seed"], row["lr"])
    run_dir = Path(bench.out_dir) / "runs" / run_name(spec)
    history = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "bench.json").unlink()
    (run_dir / "result.json").unlink()  # as if killed after the last epoch's checkpoint
    again = bench_runs.run_one(spec, str(Path(bench.out_dir) / "runs"))
    assert not again["reused"]
    assert json.loads((run_dir / "metrics.json").read_text()) == history  # no epoch was trained again
    for key in TEST_KEYS + ("time_s",):
        assert again[key] == row[key], key
