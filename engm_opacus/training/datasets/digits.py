"""The embedded digits set: scikit-learn's 8x8 handwritten digits as 16x16 images in ``[0, 1]``, split by class.

1,797 images, 10 classes, pixel values 0..16. Pixels are divided by 16 and the images are
upsampled bilinearly to 16x16 (``align_corners=False``, so every output pixel is a convex
combination of input pixels and stays in ``[0, 1]``): a 16x16 image leaves room for two
stride-2 convolutions and makes ``eps`` act on four times as many pixels as at 8x8.
The split is stratified by class and fixed by ``split_seed``: 20% test (360), 10% val
(180), the remaining 1,257 train.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from engm_opacus.training.datasets.common import DataSplits

DIGITS_SIZE = 16
DIGITS_TEST_FRACTION = 0.2
DIGITS_VAL_FRACTION = 0.1
DIGITS_SHAPE: Tuple[int, int, int] = (10, 1, DIGITS_SIZE)
"""``(num_classes, in_channels, image_size)``."""


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

    return DataSplits(part(train), part(val), part(test), *DIGITS_SHAPE)
