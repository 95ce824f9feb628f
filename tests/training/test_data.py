"""Datasets: digits split and range, seeded loaders, the layout errors of every file dataset, CIFAR read by torchvision from generated pickles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engm_opacus.training.data import CIFAR_VAL_SIZE, digits_tensors, held_out_split, limit, load_dataset, make_loader
from tests.training.fake_data import write_fake_cifar10, write_fake_cifar100


def test_digits_images_and_split() -> None:
    images, labels = digits_tensors()
    assert images.shape == (1797, 1, 16, 16) and images.dtype == torch.float32
    assert float(images.min()) == 0.0 and float(images.max()) == 1.0
    splits = load_dataset("digits")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1257, 180, 360)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (10, 1, 16)
    # the three splits partition the labels of the whole set, stratified by class
    counts = {name: torch.bincount(getattr(splits, name).tensors[1], minlength=10) for name in ("train", "val", "test")}
    assert torch.equal(counts["train"] + counts["val"] + counts["test"], torch.bincount(labels))
    assert int((counts["test"] - 0.2 * torch.bincount(labels)).abs().max()) <= 1


def test_digits_upsampling_keeps_the_8x8_image() -> None:
    """Each 2x2 block of the 16x16 image averages back to (about) the 8x8 pixel it came from."""
    from sklearn.datasets import load_digits

    images, _ = digits_tensors()
    original = torch.as_tensor(load_digits().images, dtype=torch.float32) / 16.0
    pooled = torch.nn.functional.avg_pool2d(images, 2).squeeze(1)
    # bilinear x2 mixes each pixel 9/16 with itself, 3/16 with two neighbours, 1/16 diagonally
    assert float((pooled - original).abs().mean()) < 0.1
    correlation = np.corrcoef(pooled.flatten().numpy(), original.flatten().numpy())[0, 1]
    assert correlation > 0.9


def test_split_is_seeded() -> None:
    a, b, c = load_dataset("digits"), load_dataset("digits"), load_dataset("digits", split_seed=1)
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    assert not torch.equal(a.test.tensors[0], c.test.tensors[0])


def test_loader_order_follows_the_generator_state() -> None:
    dataset = limit(load_dataset("digits").train, 40)
    assert len(dataset) == 40
    generator = torch.Generator().manual_seed(0)
    loader = make_loader(dataset, 8, shuffle=True, generator=generator)
    first = torch.cat([y for _, y in loader])
    saved = generator.get_state()
    second = torch.cat([y for _, y in loader])
    generator.set_state(saved)
    again = torch.cat([y for _, y in loader])
    assert torch.equal(second, again) and not torch.equal(first, second)
    other = torch.cat([y for _, y in make_loader(dataset, 8, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert torch.equal(first, other)
    with pytest.raises(ValueError, match="generator"):
        make_loader(dataset, 8, shuffle=True)


def test_unknown_dataset_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="digits, cifar10, cifar100, tinyimagenet"):
        load_dataset("mnist")


@pytest.mark.parametrize(
    "name,layout", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"), ("tinyimagenet", "tiny-imagenet-200")]
)
def test_missing_files_name_the_layout_and_the_fix(tmp_path: Path, name: str, layout: str) -> None:
    """Every file dataset: an empty folder or no folder at all names the expected layout, the archive and --data-dir."""
    with pytest.raises(FileNotFoundError, match=layout) as info:
        load_dataset(name, str(tmp_path))
    message = str(info.value)
    assert "expected layout" in message and "--data-dir" in message and "download" in message and "http" in message
    with pytest.raises(FileNotFoundError, match="no data_dir") as info:
        load_dataset(name, None)
    assert layout in str(info.value)


def test_partial_or_corrupt_cifar_files(tmp_path: Path) -> None:
    """A missing batch is named; a present but unreadable one is reported as corrupt, with or without the MD5 check."""
    write_fake_cifar10(tmp_path, 4)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="lacks data_batch_3"):
        load_dataset("cifar10", str(tmp_path))
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    for verify_md5 in (True, False):
        with pytest.raises(FileNotFoundError, match="corrupt or incomplete"):
            load_dataset("cifar10", str(tmp_path), verify_md5=verify_md5)
    write_fake_cifar100(tmp_path / "c100", 20, 10)
    (tmp_path / "c100" / "cifar-100-python" / "meta").unlink()
    with pytest.raises(FileNotFoundError, match="lacks meta"):
        load_dataset("cifar100", str(tmp_path / "c100"))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_splits_through_torchvision(tmp_path: Path, name: str) -> None:
    """torchvision's own CIFAR readers on pickles of the official layout, MD5 comparison off (``verify_md5=False``)."""
    if name == "cifar10":
        write_fake_cifar10(tmp_path, 20)  # 100 train, 20 test
    else:
        write_fake_cifar100(tmp_path, 100, 20)
    with pytest.raises(FileNotFoundError, match="corrupt or incomplete"):  # the default compares MD5 sums: fake bytes fail
        load_dataset(name, str(tmp_path))
    splits = load_dataset(name, str(tmp_path), verify_md5=False)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (90, 10, 20)  # the hold-out is capped at 10% here
    assert (splits.num_classes, splits.in_channels, splits.image_size) == ((10 if name == "cifar10" else 100), 3, 32)
    x_val, y_val = splits.val[0]
    assert x_val.shape == (3, 32, 32) and x_val.dtype == torch.float32 and 0.0 <= float(x_val.min()) <= float(x_val.max()) <= 1.0
    assert isinstance(y_val, int) and 0 <= y_val < splits.num_classes
    assert torch.equal(splits.val[0][0], splits.val[0][0])  # validation images are not augmented
    torch.manual_seed(0)
    crops = [splits.train[0][0] for _ in range(4)]
    assert not all(torch.equal(crops[0], crop) for crop in crops[1:])  # training images are
    # the validation images are the training file's own pixels, in [0, 1] by ToTensor
    held_out = splits.val.indices[0]
    reader = splits.val.dataset.base
    assert torch.equal(x_val, torch.as_tensor(reader.data[held_out]).permute(2, 0, 1).float() / 255)
    # train and val are disjoint and cover the training file
    assert sorted(list(splits.train.indices) + list(splits.val.indices)) == list(range(100))


def test_held_out_split_is_seeded_and_capped() -> None:
    train, val = held_out_split(50_000, 0)
    assert len(val) == CIFAR_VAL_SIZE == 1000 and len(train) == 49_000 and not set(train) & set(val)
    assert held_out_split(50_000, 0) == (train, val) and held_out_split(50_000, 1)[1] != val
    assert [len(part) for part in held_out_split(100, 0)] == [90, 10]
    assert [len(part) for part in held_out_split(5, 0)] == [4, 1]
    with pytest.raises(ValueError, match="at least 2"):
        held_out_split(1, 0)
