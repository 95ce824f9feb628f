"""TinyImageNet (200 classes, 64x64 RGB) from the extracted ``tiny-imagenet-200.zip``, read by torchvision.

Layout (what ``unzip tiny-imagenet-200.zip -d DATA_DIR`` leaves)::

    DATA_DIR/tiny-imagenet-200/
        wnids.txt                         the 200 class ids (WordNet ids such as n01443537), one a line
        train/<wnid>/images/*.JPEG        500 training images per class (100,000)
        val/images/*.JPEG                 10,000 validation images
        val/val_annotations.txt           one line per validation image: file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1

``--data-dir`` may name ``DATA_DIR`` or the ``tiny-imagenet-200`` folder itself. ``test/``
(unlabelled) and ``words.txt`` are not used. Labels are the indices of the sorted wnids
(``ImageFolder``'s convention, so they match codes that read ``train/`` with ``ImageFolder``).

Splits: the training images are read with ``torchvision.datasets.ImageFolder``; 1,000 of
them (a seeded permutation, :func:`~engm_opacus.training.datasets.common.held_out_split`) are
held out, unaugmented, for validation; the official validation set (labelled by
``val_annotations.txt``) is the test split, as in the AT literature (the official test set has
no labels). Images are decoded by torchvision's ``default_loader`` (Pillow, converted to RGB:
a few TinyImageNet JPEGs are grayscale) and become ``[3, 64, 64]`` tensors in ``[0, 1]``
(no normalization). Training images get the AT augmentation with 4-pixel padding
(:func:`~engm_opacus.training.datasets.common.at_augmentation`): the same code and padding
as CIFAR (several TinyImageNet AT codes use 8; 4 keeps one augmentation for every dataset).
The threat model stays the usual ``eps = 8/255``, PGD step ``2/255`` (``TrainConfig``'s defaults).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.utils.data import Dataset, Subset

from engm_opacus.training.datasets.common import DataSplits, Transformed, at_augmentation, held_out_split, plain_transform

TINYIMAGENET_FOLDER = "tiny-imagenet-200"
TINYIMAGENET_CLASSES = 200
TINYIMAGENET_SIZE = 64
TINYIMAGENET_CROP_PADDING = 4
TINYIMAGENET_SHAPE: Tuple[int, int, int] = (TINYIMAGENET_CLASSES, 3, TINYIMAGENET_SIZE)
"""``(num_classes, in_channels, image_size)``."""
TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINYIMAGENET_LAYOUT = (
    f"DATA_DIR/{TINYIMAGENET_FOLDER}/{{wnids.txt (the {TINYIMAGENET_CLASSES} wnids), train/<wnid>/images/*.JPEG "
    "(a folder per wnid), val/images/*.JPEG, val/val_annotations.txt (file<TAB>wnid<TAB>box per line)}"
)
"""The expected layout, as error messages print it."""


def _layout_error(problem: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"tinyimagenet files not found or incomplete: {problem} (expected layout {TINYIMAGENET_LAYOUT}; "
        f"this library never downloads). Fix: on a machine with internet, download {TINYIMAGENET_URL}, unzip it into "
        "DATA_DIR (unchanged: scripts that move val/images into val/<wnid>/ folders break this layout), then pass "
        "--data-dir DATA_DIR (data_dir=... in Python)."
    )


def find_tinyimagenet_root(data_dir: Optional[str]) -> Path:
    """The ``tiny-imagenet-200`` folder: ``data_dir/tiny-imagenet-200``, or ``data_dir`` itself if it has ``wnids.txt``."""
    if data_dir is None:
        raise _layout_error("no data_dir was given")
    given = Path(data_dir).expanduser()
    if (given / TINYIMAGENET_FOLDER).is_dir():
        return given / TINYIMAGENET_FOLDER
    if (given / "wnids.txt").is_file():
        return given
    raise _layout_error(f"{given} has neither a {TINYIMAGENET_FOLDER}/ folder nor a wnids.txt")


def read_wnids(root: Path) -> List[str]:
    """The class ids of ``root/wnids.txt``; ``FileNotFoundError`` unless it lists 200 distinct ones."""
    path = root / "wnids.txt"
    if not path.is_file():
        raise _layout_error(f"{path} is missing")
    wnids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(set(wnids)) != TINYIMAGENET_CLASSES or len(wnids) != TINYIMAGENET_CLASSES:
        raise _layout_error(f"{path} lists {len(wnids)} wnids ({len(set(wnids))} distinct), not {TINYIMAGENET_CLASSES}")
    return wnids


def read_val_annotations(root: Path, wnids: List[str]) -> List[Tuple[str, str]]:
    """``(file name, wnid)`` of every line of ``val/val_annotations.txt``, each checked against ``val/images/`` and the wnids."""
    images, path = root / "val" / "images", root / "val" / "val_annotations.txt"
    for needed in (images, path):
        if not needed.exists():
            raise _layout_error(f"{needed} is missing")
    present = {entry.name for entry in images.iterdir()}
    known = set(wnids)
    annotations: List[Tuple[str, str]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) < 2:
            raise _layout_error(f"{path} line {number} is not 'file<TAB>wnid<TAB>box': {line!r}")
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in known:
            raise _layout_error(f"{path} line {number} labels {name} with {wnid!r}, which wnids.txt does not list")
        if name not in present:
            raise _layout_error(f"{path} line {number} names {name}, which {images} lacks")
        annotations.append((name, wnid))
    if not annotations:
        raise _layout_error(f"{path} has no annotation lines")
    return annotations


class TinyImageNetVal(Dataset):
    """The official validation images as ``(image, label)`` pairs, labelled by ``val_annotations.txt``.

    ``ImageFolder`` needs a folder per class, which ``val/`` does not have; this dataset gives
    the same interface (``samples``, ``targets``, ``classes``, ``class_to_idx``) for the
    annotated flat folder and decodes with torchvision's ``default_loader``, as ``ImageFolder`` does.
    """

    def __init__(
        self, root: Path, wnids: List[str], annotations: List[Tuple[str, str]], transform: Callable[[Any], torch.Tensor]
    ):
        from torchvision.datasets.folder import default_loader

        self.classes = sorted(wnids)
        self.class_to_idx: Dict[str, int] = {wnid: index for index, wnid in enumerate(self.classes)}
        self.samples = [(str(root / "val" / "images" / name), self.class_to_idx[wnid]) for name, wnid in annotations]
        self.targets = [label for _, label in self.samples]
        self.loader = default_loader
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(self.loader(path)), label


def read_train_images(root: Path, wnids: List[str]) -> Dataset:
    """``ImageFolder(root/train)`` of untransformed ``(PIL image, label)`` pairs, checked to hold exactly the wnids' folders."""
    from torchvision.datasets import ImageFolder

    train = root / "train"
    if not train.is_dir():
        raise _layout_error(f"{train} is missing")
    missing = [wnid for wnid in wnids if not (train / wnid / "images").is_dir()]
    if missing:
        shown = ", ".join(f"train/{wnid}/images" for wnid in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise _layout_error(f"{root} lacks {shown} ({len(missing)} of {len(wnids)} class folders)")
    try:
        images = ImageFolder(str(train))
    except FileNotFoundError as error:  # a class folder without images
        raise _layout_error(f"under {train}: {error}") from error
    extra = sorted(set(images.classes) - set(wnids))
    if extra:
        raise _layout_error(f"{train} has folders of classes wnids.txt does not list: {', '.join(extra[:3])}")
    return images


def load_tinyimagenet_splits(data_dir: Optional[str], split_seed: int = 0) -> DataSplits:
    """TinyImageNet from ``data_dir`` (no download): augmented train, held-out val, the official val set as test.

    Args:
        data_dir: the folder holding ``tiny-imagenet-200/`` (or that folder itself).
        split_seed: seed of the validation hold-out.

    Raises:
        FileNotFoundError: a file or folder of the layout is absent, or ``wnids.txt`` /
            ``val_annotations.txt`` do not match the images; the message names the expected
            layout and where to get the archive.
    """
    root = find_tinyimagenet_root(data_dir)
    wnids = read_wnids(root)
    annotations = read_val_annotations(root, wnids)
    train_images = read_train_images(root, wnids)
    train_idx, val_idx = held_out_split(len(train_images), split_seed)  # type: ignore[arg-type]
    augmented = Transformed(train_images, at_augmentation(TINYIMAGENET_SIZE, TINYIMAGENET_CROP_PADDING))
    plain = Transformed(train_images, plain_transform())
    test = TinyImageNetVal(root, wnids, annotations, plain_transform())
    return DataSplits(Subset(augmented, train_idx), Subset(plain, val_idx), test, *TINYIMAGENET_SHAPE)
