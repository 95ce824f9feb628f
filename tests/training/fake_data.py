"""Tiny fake dataset trees in each real on-disk layout (CIFAR-10/100 pickles, TinyImageNet JPEGs), written for the tests."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import List

import numpy as np
from PIL import Image

CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def write_fake_cifar10(root: Path, per_batch: int, seed: int = 0) -> Path:
    """``root/cifar-10-batches-py/`` with ``per_batch`` random images in each of the 6 batches (pickles of the official keys)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in CIFAR10_FILES:
        entry = {
            "batch_label": name,
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "labels": [int(label) for label in rng.integers(0, 10, per_batch)],
            "filenames": [f"{name}_{i}.png" for i in range(per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}))
    return root


def write_fake_cifar100(root: Path, train: int, test: int, seed: int = 0) -> Path:
    """``root/cifar-100-python/{train,test,meta}`` with random images (``fine_labels`` / ``coarse_labels`` as in the archive)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name, count in (("train", train), ("test", test)):
        entry = {
            "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            "fine_labels": [int(label) for label in rng.integers(0, 100, count)],
            "coarse_labels": [int(label) for label in rng.integers(0, 20, count)],
        }
        (folder / name).write_bytes(pickle.dumps(entry))
    meta = {"fine_label_names": [f"fine{i}" for i in range(100)], "coarse_label_names": [f"coarse{i}" for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta))
    return root


def fake_wnids(count: int = 200) -> List[str]:
    """WordNet-like ids, deliberately not in sorted order in ``wnids.txt`` (the real file is not sorted either)."""
    return [f"n{(i * 7919) % 100_000:08d}" for i in range(count)]


def write_fake_tinyimagenet(root: Path, per_class: int = 1, val: int = 10, seed: int = 0) -> Path:
    """``root/tiny-imagenet-200/`` in the official layout: 200 wnids, ``per_class`` 64x64 JPEGs each, ``val`` annotated val JPEGs.

    The first class's training images are grayscale JPEGs (as a few real ones are). Returns ``root``.
    """
    rng = np.random.default_rng(seed)
    base = root / "tiny-imagenet-200"
    wnids = fake_wnids()
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (base / "words.txt").write_text("".join(f"{wnid}\tthing {i}\n" for i, wnid in enumerate(wnids)))
    for c, wnid in enumerate(wnids):
        images = base / "train" / wnid / "images"
        images.mkdir(parents=True)
        boxes = []
        for k in range(per_class):
            pixels = rng.integers(0, 256, (64, 64) if c == 0 else (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(images / f"{wnid}_{k}.JPEG", quality=90)
            boxes.append(f"{wnid}_{k}.JPEG\t0\t0\t63\t63\n")
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(boxes))
    lines = []
    for k in range(val):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(base / "val" / "images" / f"val_{k}.JPEG")
        lines.append(f"val_{k}.JPEG\t{wnids[(3 * k) % len(wnids)]}\t0\t0\t63\t63\n")
    (base / "val" / "val_annotations.txt").write_text("".join(lines))
    (base / "test" / "images").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(base / "test" / "images" / "test_0.JPEG")
    return root
