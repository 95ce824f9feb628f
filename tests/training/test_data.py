"""Datasets: digits split and range, seeded loaders, CIFAR errors and the torchvision path on fake files."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar

from engm_opacus.training.data import CIFAR_VAL_SIZE, digits_tensors, limit, load_dataset, make_loader


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
    with pytest.raises(ValueError, match="digits, cifar10, cifar100"):
        load_dataset("mnist")


@pytest.mark.parametrize("name,folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_missing_cifar_files_name_the_layout_and_the_fix(tmp_path: Path, name: str, folder: str) -> None:
    with pytest.raises(FileNotFoundError, match=folder) as info:
        load_dataset(name, str(tmp_path))
    assert "--data-dir" in str(info.value) and "download" in str(info.value)
    with pytest.raises(FileNotFoundError, match="no data_dir"):
        load_dataset(name, None)


def write_fake_cifar10(root: Path, per_batch: int) -> None:
    """CIFAR-10's pickle layout with random images (torchvision's md5 check will reject them)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, per_batch))}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))


def test_partial_or_corrupt_cifar_files(tmp_path: Path) -> None:
    write_fake_cifar10(tmp_path, 4)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="lacks data_batch_3"):
        load_dataset("cifar10", str(tmp_path))
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(FileNotFoundError, match="corrupt or incomplete"):
        load_dataset("cifar10", str(tmp_path))


def test_cifar_splits_through_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real torchvision loader on files of the official layout (md5 check bypassed for fake pixels)."""
    write_fake_cifar10(tmp_path, 220)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    splits = load_dataset("cifar10", str(tmp_path))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (5 * 220 - CIFAR_VAL_SIZE, CIFAR_VAL_SIZE, 220)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (10, 3, 32)
    x_val, _ = splits.val[0]
    assert x_val.shape == (3, 32, 32) and 0.0 <= float(x_val.min()) and float(x_val.max()) <= 1.0
    assert torch.equal(splits.val[0][0], splits.val[0][0])  # validation images are not augmented
    torch.manual_seed(0)
    crops = [splits.train[0][0] for _ in range(4)]
    assert not all(torch.equal(crops[0], crop) for crop in crops[1:])  # training images are
