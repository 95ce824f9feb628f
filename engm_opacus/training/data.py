"""Datasets and seeded data loaders for adversarial training; every input is in ``[0, 1]``.

* ``digits`` (the default, embedded): scikit-learn's 8x8 handwritten digits (1,797
  images, 10 classes, pixel values 0..16). Pixels are divided by 16 and the images are
  upsampled bilinearly to 16x16 (``align_corners=False``, so every output pixel is a convex
  combination of input pixels and stays in ``[0, 1]``): a 16x16 image leaves room for two
  stride-2 convolutions and makes ``eps`` act on four times as many pixels as at 8x8.
  The split is stratified by class and fixed by ``split_seed``: 20% test (360), 10% val
  (180), the remaining 1,257 train.
* ``cifar10`` / ``cifar100``: torchvision's loaders on files the user already has
  (``download=False``; this library never downloads). Train images get the AT codebases'
  augmentation (4-pixel padded random crop, horizontal flip); the last ``1000`` images of a
  seeded permutation of the training set are held out (unaugmented) for validation; the
  test split is the official test set.

Data loaders use ``num_workers=0`` and a seeded ``torch.Generator`` for shuffling, so the
batch order is a function of the generator's state (saved in checkpoints for resume).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

DATASETS: Tuple[str, ...] = ("digits", "cifar10", "cifar100")
DIGITS_SIZE = 16
DIGITS_TEST_FRACTION = 0.2
DIGITS_VAL_FRACTION = 0.1
CIFAR_VAL_SIZE = 1000
DATASET_SHAPES: Dict[str, Tuple[int, int, int]] = {"digits": (10, 1, DIGITS_SIZE), "cifar10": (10, 3, 32), "cifar100": (100, 3, 32)}
"""``(num_classes, in_channels, image_size)`` of each dataset (what a model needs to be built)."""

CIFAR_LAYOUT = {
    "cifar10": (
        "cifar-10-batches-py",
        ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch", "batches.meta"),
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "CIFAR10",
    ),
    "cifar100": (
        "cifar-100-python",
        ("train", "test", "meta"),
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "CIFAR100",
    ),
}


@dataclass(frozen=True)
class DataSplits:
    """Train / validation / test datasets of ``(image [C, H, W] in [0, 1], label)`` pairs.

    Attributes:
        train, val, test: the three splits.
        num_classes: number of labels.
        in_channels: image channels (1 for digits, 3 for CIFAR).
        image_size: image height = width.
    """

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int


def digits_tensors() -> Tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as ``[N, 1, 16, 16]`` float32 images in ``[0, 1]`` and ``[N]`` int64 labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    return images.clamp_(0.0, 1.0), torch.as_tensor(bunch.target, dtype=torch.int64)


def load_digits_splits(split_seed: int = 0) -> DataSplits:
    """The digits train/val/test split, stratified by class and fixed by ``split_seed``."""
    from sklearn.model_selection import train_test_split

    images, labels = digits_tensors()
    indices = list(range(len(labels)))
    rest, test = train_test_split(
        indices, test_size=DIGITS_TEST_FRACTION, random_state=split_seed, stratify=labels.numpy()
    )
    val_share = DIGITS_VAL_FRACTION / (1.0 - DIGITS_TEST_FRACTION)
    train, val = train_test_split(rest, test_size=val_share, random_state=split_seed, stratify=labels[rest].numpy())

    def part(idx: list[int]) -> TensorDataset:
        index = torch.as_tensor(sorted(idx))
        return TensorDataset(images[index], labels[index])

    return DataSplits(part(train), part(val), part(test), *DATASET_SHAPES["digits"])


def require_cifar_files(name: str, data_dir: Optional[str]) -> Path:
    """Return ``data_dir`` as a path if it holds the extracted CIFAR files, else raise ``FileNotFoundError``."""
    folder, files, url, cls = CIFAR_LAYOUT[name]
    how = (
        f"Fix: on a machine with internet, download {url} and extract it into DATA_DIR "
        f"(or run python -c \"import torchvision; torchvision.datasets.{cls}('DATA_DIR', download=True)\"), "
        "then pass --data-dir DATA_DIR (data_dir=... in Python)."
    )
    expected = f"DATA_DIR/{folder}/{{{','.join(files)}}}"
    if data_dir is None:
        raise FileNotFoundError(f"{name} needs its files on disk ({expected}) and no data_dir was given. {how}")
    root = Path(data_dir).expanduser()
    missing = [f for f in files if not (root / folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{name} files not found: {root / folder} lacks {', '.join(missing)} "
            f"(expected layout {expected}; this library never downloads). {how}"
        )
    return root


def load_cifar_splits(name: str, data_dir: Optional[str], split_seed: int = 0) -> DataSplits:
    """CIFAR-10/100 from ``data_dir`` (no download): augmented train, held-out val, official test."""
    import torchvision
    from torchvision import transforms

    root = require_cifar_files(name, data_dir)
    cls = getattr(torchvision.datasets, CIFAR_LAYOUT[name][3])
    augment = transforms.Compose(
        [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor()]
    )
    plain = transforms.ToTensor()
    try:
        train_aug = cls(str(root), train=True, download=False, transform=augment)
        train_plain = cls(str(root), train=True, download=False, transform=plain)
        test = cls(str(root), train=False, download=False, transform=plain)
    except RuntimeError as error:  # torchvision's integrity (md5) check failed
        raise FileNotFoundError(
            f"{name} files under {root / CIFAR_LAYOUT[name][0]} are present but corrupt or incomplete ({error}). "
            "Fix: re-extract the official archive there."
        ) from error
    order = torch.randperm(len(train_aug), generator=torch.Generator().manual_seed(split_seed)).tolist()
    train_idx, val_idx = sorted(order[:-CIFAR_VAL_SIZE]), sorted(order[-CIFAR_VAL_SIZE:])
    return DataSplits(Subset(train_aug, train_idx), Subset(train_plain, val_idx), test, *DATASET_SHAPES[name])


def load_dataset(name: str, data_dir: Optional[str] = None, *, split_seed: int = 0) -> DataSplits:
    """Load a dataset's train/val/test splits by name.

    Args:
        name: one of :data:`DATASETS`.
        data_dir: folder holding the CIFAR files (ignored for digits).
        split_seed: seed of the train/val(/test) split (not of training).

    Raises:
        ValueError: unknown ``name`` (the message lists the valid ones).
        FileNotFoundError: CIFAR files absent; the message names the expected layout and how to get them.
    """
    if name == "digits":
        return load_digits_splits(split_seed)
    if name in CIFAR_LAYOUT:
        return load_cifar_splits(name, data_dir, split_seed)
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
