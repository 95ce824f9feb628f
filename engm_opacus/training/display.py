"""What a training run prints: a rich progress bar per epoch, the epoch table and the test-result table."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from engm_opacus.training.config import OPTIMIZER_LABELS, TrainConfig, format_eps


class Display:
    """Rich progress bar per epoch and result tables; silent when ``enabled`` is ``False``."""

    def __init__(self, enabled: bool, console: Optional[Console]):
        self.enabled = enabled
        self.console = console or Console()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f}  clean {task.fields[clean]:.1%}  robust {task.fields[robust]:.1%}"),
            TimeElapsedColumn(),
            console=self.console,
            disable=not enabled,
        )

    def print(self, *objects: Any) -> None:
        """``console.print`` when enabled."""
        if self.enabled:
            self.console.print(*objects)


def run_title(config: TrainConfig) -> str:
    """``ENGM (gamma 1) + pgd-at`` style name of a run's optimizer and AT method."""
    gamma = f" (gamma {config.gamma:g})" if config.uses_engm else ""
    return f"{OPTIMIZER_LABELS[config.optimizer]}{gamma} + {config.at_method}"


def epoch_table(history: List[Dict[str, Any]]) -> Table:
    """One row per epoch: lr, train loss / clean / robust accuracy, validation clean / PGD accuracy, time."""
    table = Table(title="Epochs")
    for column in ("epoch", "lr", "train loss", "train clean", "train robust", "val clean", "val PGD", "time s"):
        table.add_column(column, justify="right")
    for r in history:
        table.add_row(
            str(r["epoch"]), f"{r['lr']:.4g}", f"{r['train_loss']:.3f}", f"{r['train_clean_acc']:.1%}",
            f"{r['train_robust_acc']:.1%}", f"{r['val_clean_acc']:.1%}", f"{r['val_pgd_acc']:.1%}", f"{r['time_s']:.1f}",
        )
    return table


def result_table(config: TrainConfig, epochs: int, best_epoch: int, test_last: Dict[str, Any], test_best: Dict[str, Any]) -> Table:
    """Clean and PGD test accuracy of the last and the best-validation model."""
    table = Table(title=f"{OPTIMIZER_LABELS[config.optimizer]} + {config.at_method} on {config.dataset} test split (eps {format_eps(config.eps)})")
    table.add_column("model")
    table.add_column("clean acc", justify="right")
    table.add_column(f"PGD-{config.test_pgd_steps} acc", justify="right")
    for label, metrics in ((f"last (epoch {epochs})", test_last), (f"best val (epoch {best_epoch})", test_best)):
        table.add_row(label, f"{metrics['clean_acc']:.2%}", f"{metrics['pgd_acc']:.2%}")
    return table
