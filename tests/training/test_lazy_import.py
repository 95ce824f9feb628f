"""``import engm_opacus`` loads no harness module; the harness names load on first use and stay callable."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
import engm_opacus

harness = ("engm_opacus.at", "engm_opacus.training", "engm_opacus.experiments", "engm_opacus.cli")
loaded = sorted(m for m in sys.modules if m.startswith(harness))
assert not loaded, loaded
assert "rich" not in sys.modules and "pyautoattack" not in sys.modules and "matplotlib" not in sys.modules

from engm_opacus import TrainConfig, TrainResult, evaluate, train
from engm_opacus.training.evaluation import evaluate as evaluate_in_module
from engm_opacus.training.loop import TrainResult as result_in_module, train as train_in_module

assert evaluate is evaluate_in_module and TrainResult is result_in_module
assert TrainConfig().validate().lr == 0.5
assert train is train_in_module and engm_opacus.train is train_in_module
import engm_opacus.cli, engm_opacus.experiments.benchmark, engm_opacus.experiments.diagnostics
assert "pyautoattack" not in sys.modules and "matplotlib" not in sys.modules  # the [eval] / [plots] extras load on use
print("ok")
"""


def test_core_import_loads_no_harness_and_harness_names_load_lazily() -> None:
    completed = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "ok"
