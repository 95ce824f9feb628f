"""What a stopped training run reports: ``TrainingInterrupted`` (Ctrl-C), the resume command, and the latest checkpoint."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass
class SavedCheckpoint:
    """The run's latest complete checkpoint (``None`` before the first) and its epoch."""

    checkpoint: Optional[Path]
    epoch: int


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`~engm_opacus.training.loop.train`; the message names the last checkpoint and the resume command.

    Attributes:
        checkpoint: the last checkpoint of the run (``None``: none was written yet).
        epoch: the epoch it holds (0 when none).
        command: the shell command that resumes the run (``None`` when there is no checkpoint).
    """

    def __init__(self, checkpoint: Optional[Path], epoch: int, command: Optional[str]):
        self.checkpoint, self.epoch, self.command = checkpoint, epoch, command
        if checkpoint is None:
            message = "no checkpoint was written yet (nothing to resume); start the run again"
        else:
            message = f"last checkpoint {checkpoint} (epoch {epoch}); resume with: {command}"
        super().__init__(message)


def resume_command(checkpoint: Path, out_dir: Path, nproc: int = 1) -> str:
    """``engm-opacus train --resume CHECKPOINT`` (with ``--out-dir`` when the run writes elsewhere).

    ``nproc > 1`` (a ``torchrun`` job): ``torchrun --nproc_per_node NPROC -m engm_opacus train --resume ...``.
    """
    launcher = ["torchrun", "--nproc_per_node", str(nproc), "-m", "engm_opacus"] if nproc > 1 else ["engm-opacus"]
    words = [*launcher, "train", "--resume", str(checkpoint)]
    if Path(checkpoint).parent != out_dir:
        words += ["--out-dir", str(out_dir)]
    return shlex.join(words)
