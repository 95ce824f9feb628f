"""Smoke tests of ``examples/``: each digits script runs end to end on a tiny budget and prints accuracy.

The budget (64 training digits = one step, PGD-1, 32 test digits) checks that every script
runs against the current public API, not how well it trains. The CIFAR script is checked on
its missing-files path (this machine has no CIFAR files and nothing downloads).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
TINY = ["--epochs", "1", "--max-train-examples", "64", "--max-test-examples", "32", "--pgd-steps", "1", "--eval-pgd-steps", "1"]
ACCURACY = re.compile(r"test: clean accuracy (\d\.\d{3}), PGD-1 accuracy (\d\.\d{3})")


def run_example(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


DIGITS_EXAMPLES = ["pgd_at_digits.py", "trades_digits.py", "mart_digits.py", "awp_digits.py", "custom_loss.py"]
MISSING_DATA_DIR = "/nonexistent-engm-opacus-cifar"


@pytest.fixture(scope="module")
def runs() -> Dict[str, subprocess.CompletedProcess]:
    """All example runs, two at a time (one torch thread each: the CI machine has two cores)."""
    jobs = {name: (name, *TINY) for name in DIGITS_EXAMPLES}
    jobs["cifar10_preact_resnet18.py"] = ("cifar10_preact_resnet18.py", "--data-dir", MISSING_DATA_DIR)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_example, *args) for name, args in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("name", DIGITS_EXAMPLES)
def test_digits_example_runs_and_prints_accuracy(name: str, runs: Dict[str, subprocess.CompletedProcess]) -> None:
    result = runs[name]
    assert result.returncode == 0, result.stderr[-3000:]
    match = ACCURACY.search(result.stdout)
    assert match, f"no accuracy line in the output of {name}:\n{result.stdout}"
    clean, robust = float(match.group(1)), float(match.group(2))
    assert 0.0 <= robust <= 1.0 and 0.0 <= clean <= 1.0
    assert re.search(r"^epoch 1: ", result.stdout, re.MULTILINE)


def test_cifar_example_without_files_exits_2_naming_the_layout(runs: Dict[str, subprocess.CompletedProcess]) -> None:
    result = runs["cifar10_preact_resnet18.py"]
    assert result.returncode == 2
    assert "cifar-10-batches-py" in result.stderr and "--data-dir" in result.stderr
    assert "Traceback" not in result.stderr


def test_every_example_is_tested_and_documented() -> None:
    scripts = {p.name for p in EXAMPLES.glob("*.py")}
    assert scripts == {
        "pgd_at_digits.py", "trades_digits.py", "mart_digits.py", "awp_digits.py", "custom_loss.py", "cifar10_preact_resnet18.py",
    }
    docs = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "docs").rglob("*.md"))
    for script in scripts:
        assert f"examples/{script}" in docs, f"examples/{script} is not shown on any docs page"
