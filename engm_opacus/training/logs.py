"""Atomic file writes and the one CSV / JSON writer every harness module logs through.

A crash (or a signal-raised interrupt) at any point of a write leaves either the old file or the
new one, never a partial file: the bytes go to a temporary file in the destination folder, are
flushed and fsynced, the file is renamed over the destination with ``os.replace`` and the folder
is fsynced. Checkpoints (:mod:`engm_opacus.training.checkpoints`), the training logs
(``metrics.json``, ``metrics.csv``, ``result.json``), the benchmark tables and the diagnostics
CSV files are all written here. A write that fails with an ``OSError`` (full disk, no permission,
read-only file system) raises :class:`OutputError`, which names the destination and the errno.
:func:`claim_new_dir` creates a run folder no concurrent process can also get, and
:func:`merge_eval_results` updates ``<checkpoint>.eval.json`` without losing earlier measurements.
"""

from __future__ import annotations

import csv
import errno as errno_codes
import hashlib
import io
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Mapping, Optional, Sequence, Union

PathLike = Union[str, os.PathLike]


class OutputError(OSError):
    """Writing ``filename`` failed with ``errno`` (ENOSPC, EACCES, EROFS, ...); the previous file is intact.

    ``str(error)`` is one line: ``cannot write PATH: STRERROR (ENOSPC, errno 28)``, plus
    :attr:`hint` (e.g. the resume command the training loop adds) when set.
    """

    def __init__(self, errno: Optional[int], strerror: str, filename: str, hint: str = ""):
        super().__init__(errno, strerror, filename)
        self.hint = hint

    def __str__(self) -> str:
        code = f" ({errno_codes.errorcode.get(self.errno, '?')}, errno {self.errno})" if self.errno is not None else ""
        hint = f"; {self.hint}" if self.hint else ""
        return f"cannot write {self.filename}: {self.strerror}{code}; the previous file is intact{hint}"


def _output_error(error: OSError, target: Path) -> OutputError:
    if isinstance(error, OutputError):
        return error
    return OutputError(error.errno, error.strerror or str(error), str(target))


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

    Raises:
        OutputError: an ``OSError`` while creating the folder or writing (``ENOSPC``, ``EACCES``,
            ``EROFS``, ...), re-raised with ``path`` as its filename.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as error:
        raise _output_error(error, target) from error
    try:
        os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException as error:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise _output_error(error, target) from error
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


def claim_new_dir(base: PathLike) -> Path:
    """Create and return ``base``, or ``base-2``, ``base-3``, ... : the first that did not exist.

    ``mkdir`` without ``exist_ok`` is atomic, so concurrent callers with the same ``base`` (two runs
    started in the same second) each get their own folder.

    Raises:
        OutputError: the folder cannot be created (``EACCES``, ``EROFS``, ``ENOSPC``, ...).
    """
    base = Path(base)
    number = 1
    while True:
        candidate = base if number == 1 else base.with_name(f"{base.name}-{number}")
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            return candidate
        except FileExistsError:
            number += 1
        except OSError as error:
            raise _output_error(error, candidate) from error


def sha256_of(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (identifies the checkpoint an evaluation measured)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


EVAL_IDENTITY_KEYS = ("checkpoint_sha256", "epoch", "dataset", "model", "optimizer", "at_method")
"""Keys that identify the evaluated model: earlier measurements are kept only where both files agree on them."""
EVAL_SHARED_SETTINGS: Dict[str, Sequence[str]] = {"clean_acc": ("examples",), "pgd_acc": ("examples", "eps", "step_size")}
"""Settings of a measurement besides its own ``<name>_*`` keys (default: ``examples``, ``eps``)."""


def _measurement_settings(results: Mapping[str, Any], measurement: str) -> Dict[str, Any]:
    """``measurement``'s settings in a flat results dict: shared keys and its ``<prefix>_*`` keys."""
    prefix = measurement[: -len("acc")]
    shared = EVAL_SHARED_SETTINGS.get(measurement, ("examples", "eps"))
    return {k: v for k, v in results.items() if (k in shared or k.startswith(prefix)) and k != measurement}


def _read_json_object(path: Path) -> Dict[str, Any]:
    """The JSON object in ``path``; ``{}`` if absent. An unreadable file is moved aside (``.unreadable[-N]``), not lost."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            return data
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        pass
    number = 1
    while True:
        target = path.with_name(f"{path.name}.unreadable" + ("" if number == 1 else f"-{number}"))
        if not target.exists():
            break
        number += 1
    os.replace(path, target)
    warnings.warn(f"{path} was not a JSON object; moved it to {target} and started a new file.", stacklevel=3)
    return {}


def merge_eval_results(path: PathLike, new: Mapping[str, Any]) -> Dict[str, Any]:
    """Merge ``new`` evaluation results into the JSON file ``path`` atomically; return what was written.

    A measurement is a key ending in ``_acc`` (``clean_acc``, ``pgd_acc``, ``autoattack_acc``);
    ``None`` means "not measured in this run". The merged file is ``new``, except that a
    measurement ``new`` did not make keeps the earlier file's value and its ``<name>_*`` keys
    (e.g. ``autoattack_version``) when both files describe the same model (equal
    :data:`EVAL_IDENTITY_KEYS` where both have them). ``measured_with`` records, per measurement
    present, the settings it was measured with (``examples``, ``eps``, its ``<name>_*`` keys, ...),
    so a kept AutoAttack number keeps its own example count and version while the top-level keys
    describe the latest run.

    Raises:
        OutputError: the file cannot be written; the earlier file is intact.
    """
    target = Path(path)
    old = _read_json_object(target)
    merged: Dict[str, Any] = {k: v for k, v in new.items() if k != "measured_with"}
    same_model = all(old.get(key) == new.get(key) for key in EVAL_IDENTITY_KEYS if key in old and key in new)
    old_settings = old.get("measured_with") if isinstance(old.get("measured_with"), dict) else {}
    measured_with: Dict[str, Dict[str, Any]] = {}
    for measurement in dict.fromkeys(k for k in (*new, *old) if k.endswith("_acc")):
        prefix = measurement[: -len("acc")]
        if new.get(measurement) is not None:
            measured_with[measurement] = _measurement_settings(new, measurement)
        elif same_model and old.get(measurement) is not None:
            for key in [k for k in merged if k.startswith(prefix) and k != measurement]:
                del merged[key]
            merged.update({k: v for k, v in old.items() if k.startswith(prefix)})
            measured_with[measurement] = old_settings.get(measurement) or _measurement_settings(old, measurement)
    merged["measured_with"] = measured_with
    write_json(merged, target)
    return merged
