"""What the dataset readers share: the ``DataSplits`` record, the seeded validation hold-out, per-split transforms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Tuple

import torch
from torch.utils.data import Dataset

VAL_SIZE = 1000
"""Training images held out for validation by the file datasets (CIFAR, TinyImageNet): at most this many."""


@dataclass(frozen=True)
class DataSplits:
    """Train / validation / test datasets of ``(image [C, H, W] in [0, 1], label)`` pairs.

    Attributes:
        train, val, test: the three splits.
        num_classes: number of labels.
        in_channels: image channels (1 for digits, 3 for CIFAR and TinyImageNet).
        image_size: image height = width.
    """

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int


def held_out_split(n: int, split_seed: int, val_size: int = VAL_SIZE) -> Tuple[List[int], List[int]]:
    """Sorted ``(train, val)`` indices of a training set of ``n`` images.

    ``val`` is the last ``k = min(val_size, n // 10)`` (at least 1) indices of the permutation
    ``torch.randperm(n)`` drawn from a generator seeded with ``split_seed``; ``train`` the other
    ``n - k``. On the real datasets ``k = val_size`` (1,000 of CIFAR's 50,000 or TinyImageNet's
    100,000 images); the 10% cap only applies to small trees such as the tests' generated ones.

    Raises:
        ValueError: ``n < 2`` (nothing left to train on after the hold-out).
    """
    if n < 2:
        raise ValueError(f"A training set of {n} image(s) cannot be split into train and validation; it needs at least 2.")
    k = max(1, min(val_size, n // 10))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed)).tolist()
    return sorted(order[:-k]), sorted(order[-k:])


class Transformed(Dataset):
    """``base[i]`` with ``transform`` applied to its image: one decoded dataset read with two transforms.

    The training and validation splits come from the same files; the training split is
    augmented and the validation split is not, so each split reads the untransformed
    ``(PIL image, label)`` dataset through its own view instead of reading the files twice.
    """

    def __init__(self, base: Dataset, transform: Callable[[Any], torch.Tensor]):
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        image, label = self.base[index]
        return self.transform(image), label


def at_augmentation(image_size: int, padding: int = 4) -> Callable[[Any], torch.Tensor]:
    """The AT codebases' training augmentation: random ``image_size`` crop of the zero-padded image, horizontal flip, ``[0, 1]`` tensor.

    ``RandomCrop(image_size, padding=padding)`` pads every side with ``padding`` black pixels and
    crops a random ``image_size`` square (a shift of up to ``padding`` pixels),
    ``RandomHorizontalFlip()`` mirrors half the images, ``ToTensor()`` maps ``uint8`` pixels
    to ``[0, 1]``. No normalization: the model sees ``[0, 1]`` inputs, where ``eps`` is defined.
    """
    from torchvision import transforms

    return transforms.Compose(
        [transforms.RandomCrop(image_size, padding=padding), transforms.RandomHorizontalFlip(), transforms.ToTensor()]
    )


def plain_transform() -> Callable[[Any], torch.Tensor]:
    """Validation and test images: ``ToTensor()`` only (``uint8`` pixels to ``[0, 1]``, no augmentation)."""
    from torchvision import transforms

    return transforms.ToTensor()
