"""Atomic file writes and the one CSV / JSON writer every harness module logs through.

A crash (or a signal-raised interrupt) at any point of a write leaves either the old file or the
new one, never a partial file: the bytes go to a temporary file in the destination folder, are
flushed and fsynced, the file is renamed over the destination with ``os.replace`` and the folder
is fsynced. Checkpoints (:mod:`engm_opacus.training.checkpoints`), the training logs
(``metrics.json``, ``metrics.csv``, ``result.json``), the benchmark tables and the diagnostics
CSV files are all written here.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, Optional, Sequence, Union

PathLike = Union[str, os.PathLike]


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op on platforms without directory fds)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Create or replace ``path`` atomically with the bytes ``write(handle)`` produces; return the path.

    Temp file in the same folder -> ``flush`` + ``fsync`` -> ``os.replace`` -> ``fsync`` of the
    folder. On any exception (or signal-raised interrupt) the temp file is removed and
    ``path`` is untouched; after a hard kill only a hidden ``.NAME.*.tmp`` file can remain.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    return target


def atomic_write_text(text: str, path: PathLike) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def write_json(data: Any, path: PathLike) -> Path:
    """Write ``data`` as indented JSON (trailing newline) to ``path`` atomically; return the path."""
    return atomic_write_text(json.dumps(data, indent=2) + "\n", path)


def write_csv(rows: Sequence[Mapping[str, Any]], path: PathLike, columns: Optional[Sequence[str]] = None) -> Path:
    """Write ``rows`` as CSV with a header row to ``path`` atomically; return the path.

    Args:
        rows: one mapping per row.
        path: the destination.
        columns: the columns, in order (keys outside them are ignored); ``None``: every key of
            the rows in first-seen order.

    Non-finite floats (NaN, inf: "not measured") are written as empty cells; missing keys too.
    """
    header = list(columns) if columns is not None else list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()})
    return atomic_write_text(buffer.getvalue(), path)
