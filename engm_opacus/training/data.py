"""Datasets by name and seeded data loaders for adversarial training; every input is in ``[0, 1]``.

| ``--dataset`` | classes | image | ``--data-dir`` | train / val / test |
|---|---|---|---|---|
| ``digits`` | 10 | 1x16x16 | not used | 1,257 / 180 / 360, stratified (embedded set) |
| ``cifar10`` | 10 | 3x32x32 | required | 49,000 / 1,000 held out / official 10,000 test |
| ``cifar100`` | 100 | 3x32x32 | required | 49,000 / 1,000 held out / official 10,000 test |
| ``tinyimagenet`` | 200 | 3x64x64 | required | 99,000 / 1,000 held out / official 10,000 val |

The readers live in :mod:`engm_opacus.training.datasets` (one module per dataset, where each
one's on-disk layout, augmentation and split are documented); this module names them.
The file datasets are never downloaded: a missing or partial layout raises
``FileNotFoundError`` naming the expected files and where to get them. Training images of the
file datasets get the AT augmentation (4-pixel padded random crop, horizontal flip); the
validation and test images are not augmented.

Data loaders use ``num_workers=0`` and a seeded ``torch.Generator`` for shuffling, so the
batch order is a function of the generator's state (saved in checkpoints for resume).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from engm_opacus.training.datasets.cifar import CIFAR_LAYOUT, CIFAR_SHAPES, load_cifar_splits, require_cifar_files
from engm_opacus.training.datasets.common import VAL_SIZE, DataSplits, held_out_split
from engm_opacus.training.datasets.digits import DIGITS_SHAPE, DIGITS_SIZE, digits_tensors, load_digits_splits
from engm_opacus.training.datasets.tinyimagenet import TINYIMAGENET_SHAPE, load_tinyimagenet_splits

__all__ = [
    "CIFAR_LAYOUT", "CIFAR_VAL_SIZE", "DATA_DIR_HELP", "DATASETS", "DATASET_SHAPES", "DIGITS_SIZE", "DataSplits", "VAL_SIZE",
    "digits_tensors", "held_out_split", "limit", "load_cifar_splits", "load_dataset", "load_digits_splits",
    "load_tinyimagenet_splits", "make_loader", "require_cifar_files",
]

DATASETS: Tuple[str, ...] = ("digits", "cifar10", "cifar100", "tinyimagenet")
"""The dataset names of :func:`load_dataset`, ``TrainConfig.dataset`` and ``--dataset``."""
DATASET_SHAPES: Dict[str, Tuple[int, int, int]] = {"digits": DIGITS_SHAPE, **CIFAR_SHAPES, "tinyimagenet": TINYIMAGENET_SHAPE}
"""``(num_classes, in_channels, image_size)`` of each dataset (what a model needs to be built)."""
DATA_DIR_HELP = "folder with the dataset's files: cifar-10-batches-py/, cifar-100-python/ or tiny-imagenet-200/ (not used by digits)"
"""The one-line description of ``data_dir`` / ``--data-dir`` (for help texts)."""
CIFAR_VAL_SIZE = VAL_SIZE
"""Training images held out for validation (CIFAR and TinyImageNet): 1,000."""


def load_dataset(name: str, data_dir: Optional[str] = None, *, split_seed: int = 0, verify_md5: bool = True) -> DataSplits:
    """Load a dataset's train/val/test splits by name.

    Args:
        name: one of :data:`DATASETS`.
        data_dir: folder holding the dataset's files (``cifar-10-batches-py/``,
            ``cifar-100-python/`` or ``tiny-imagenet-200/``); ignored for digits.
        split_seed: seed of the train/val(/test) split (not of training).
        verify_md5: CIFAR only: compare the files with torchvision's MD5 sums (default);
            ``False`` skips the comparison (see :mod:`engm_opacus.training.datasets.cifar`).
            TinyImageNet has no published checksums; its layout is checked instead.

    Raises:
        ValueError: unknown ``name`` (the message lists the valid ones).
        FileNotFoundError: files absent, partial or corrupt; the message names the expected
            layout and how to get the files.
    """
    if name == "digits":
        return load_digits_splits(split_seed)
    if name in CIFAR_LAYOUT:
        return load_cifar_splits(name, data_dir, split_seed, verify_md5=verify_md5)
    if name == "tinyimagenet":
        return load_tinyimagenet_splits(data_dir, split_seed)
    raise ValueError(f"Unknown dataset {name!r}. Fix: use one of {', '.join(DATASETS)}.")


def limit(dataset: Dataset, max_examples: Optional[int]) -> Dataset:
    """The first ``max_examples`` examples of ``dataset`` (all of it when ``None`` or larger)."""
    if max_examples is None or max_examples >= len(dataset):  # type: ignore[arg-type]
        return dataset
    if max_examples <= 0:
        raise ValueError(f"max_examples must be positive or None, got {max_examples}.")
    return Subset(dataset, range(max_examples))


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, generator: Optional[torch.Generator] = None) -> DataLoader:
    """A single-process ``DataLoader``; with ``shuffle=True`` its order is drawn from ``generator``.

    ``drop_last`` is off: the last, smaller batch is trained on (ENGM averages over the
    actual batch size).
    """
    if shuffle and generator is None:
        raise ValueError("A shuffling loader needs a seeded generator. Fix: pass generator=torch.Generator().manual_seed(seed).")
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=0)
