"""CIFAR-10 and CIFAR-100 from the extracted python archives, read by torchvision (this library never downloads).

Layout (what ``tar xzf cifar-10-python.tar.gz -C DATA_DIR`` leaves)::

    DATA_DIR/cifar-10-batches-py/{data_batch_1, ..., data_batch_5, test_batch, batches.meta}
    DATA_DIR/cifar-100-python/{train, test, meta}

Training images get the AT codebases' augmentation (4-pixel zero-padded random 32x32 crop,
horizontal flip; :func:`~engm_opacus.training.datasets.common.at_augmentation`); 1,000 images
of a seeded permutation of the training set are held out, unaugmented, for validation
(:func:`~engm_opacus.training.datasets.common.held_out_split`); the test split is the
official test set. Images are ``[3, 32, 32]`` in ``[0, 1]`` (no normalization).

Integrity: by default torchvision's readers compare every file with its published MD5 sum
(``CIFAR10._check_integrity``, called in ``__init__``, and the meta file's check in
``_load_meta``). ``verify_md5=False`` reads through :func:`unverified_cifar_class`, a
subclass that overrides exactly those two methods to check only that the files exist: for
files re-packed by another tool (same pickle layout, other bytes) and for the tests, which
write small pickles of the official layout.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Dict, NamedTuple, Optional, Tuple, Type

from torch.utils.data import Subset
from engm_opacus.training.datasets.common import DataSplits, Transformed, at_augmentation, held_out_split, plain_transform

if TYPE_CHECKING:
    from torchvision.datasets import CIFAR10

CIFAR_SIZE = 32
CIFAR_CROP_PADDING = 4


class CifarLayout(NamedTuple):
    """Where one CIFAR variant's files live under ``DATA_DIR`` and where to get them."""

    folder: str
    files: Tuple[str, ...]
    url: str
    reader: str
    num_classes: int

    def reader_class(self, verify_md5: bool = True) -> Type["CIFAR10"]:
        """torchvision's reader (``torchvision.datasets.<reader>``), or its :func:`unverified_cifar_class`."""
        import torchvision.datasets

        reader = getattr(torchvision.datasets, self.reader)
        return reader if verify_md5 else unverified_cifar_class(reader)


CIFAR_LAYOUT: Dict[str, CifarLayout] = {
    "cifar10": CifarLayout(
        "cifar-10-batches-py",
        ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch", "batches.meta"),
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "CIFAR10",
        10,
    ),
    "cifar100": CifarLayout(
        "cifar-100-python", ("train", "test", "meta"), "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "CIFAR100", 100
    ),
}
CIFAR_SHAPES: Dict[str, Tuple[int, int, int]] = {name: (layout.num_classes, 3, CIFAR_SIZE) for name, layout in CIFAR_LAYOUT.items()}
"""``(num_classes, in_channels, image_size)`` of each variant."""


def unverified_cifar_class(reader: Type["CIFAR10"]) -> Type["CIFAR10"]:
    """``reader`` (``CIFAR10`` or ``CIFAR100``) without the MD5 comparison; everything else is torchvision's.

    Overrides ``_check_integrity`` (torchvision calls it in ``__init__`` and raises
    ``RuntimeError`` when it is false) to require only that the data files exist, and
    ``_load_meta`` to read the label names without its MD5 check. Reading the pickles,
    the ``[N, 32, 32, 3]`` layout and ``__getitem__`` are torchvision's own code.
    """

    class Unverified(reader):  # type: ignore[valid-type, misc]
        def _check_integrity(self) -> bool:
            folder = Path(self.root) / self.base_folder
            return all((folder / name).is_file() for name, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:
            with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as infile:
                self.classes = pickle.load(infile, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {label: index for index, label in enumerate(self.classes)}

    Unverified.__name__ = Unverified.__qualname__ = f"Unverified{reader.__name__}"
    return Unverified


def require_cifar_files(name: str, data_dir: Optional[str]) -> Path:
    """Return ``data_dir`` as a path if it holds the extracted CIFAR files, else raise ``FileNotFoundError``."""
    layout = CIFAR_LAYOUT[name]
    how = (
        f"Fix: on a machine with internet, download {layout.url} and extract it into DATA_DIR "
        f"(or run python -c \"import torchvision; torchvision.datasets.{layout.reader}('DATA_DIR', download=True)\"), "
        "then pass --data-dir DATA_DIR (data_dir=... in Python)."
    )
    expected = f"DATA_DIR/{layout.folder}/{{{','.join(layout.files)}}}"
    if data_dir is None:
        raise FileNotFoundError(f"{name} needs its files on disk ({expected}) and no data_dir was given. {how}")
    root = Path(data_dir).expanduser()
    missing = [f for f in layout.files if not (root / layout.folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{name} files not found: {root / layout.folder} lacks {', '.join(missing)} "
            f"(expected layout {expected}; this library never downloads). {how}"
        )
    return root


def load_cifar_splits(name: str, data_dir: Optional[str], split_seed: int = 0, *, verify_md5: bool = True) -> DataSplits:
    """CIFAR-10/100 from ``data_dir`` (no download): augmented train, held-out val, official test.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        data_dir: the folder that holds ``cifar-10-batches-py/`` or ``cifar-100-python/``.
        split_seed: seed of the validation hold-out.
        verify_md5: compare the files with torchvision's MD5 sums (default); ``False`` reads them
            through :func:`unverified_cifar_class` (existence check only).

    Raises:
        FileNotFoundError: files absent (the message names the expected layout and where to get
            them), or present but corrupt (MD5 mismatch, unreadable pickle).
    """
    layout = CIFAR_LAYOUT[name]
    root = require_cifar_files(name, data_dir)
    reader = layout.reader_class(verify_md5)
    try:
        train_images = reader(str(root), train=True, download=False)  # (PIL image, label) pairs
        test = reader(str(root), train=False, download=False, transform=plain_transform())
    except (RuntimeError, pickle.UnpicklingError, EOFError, KeyError, ValueError) as error:
        raise FileNotFoundError(
            f"{name} files under {root / layout.folder} are present but corrupt or incomplete ({error!r}). "
            f"Fix: re-extract the official archive ({layout.url}) there."
        ) from error
    train_idx, val_idx = held_out_split(len(train_images), split_seed)
    augmented = Transformed(train_images, at_augmentation(CIFAR_SIZE, CIFAR_CROP_PADDING))
    plain = Transformed(train_images, plain_transform())
    return DataSplits(Subset(augmented, train_idx), Subset(plain, val_idx), test, *CIFAR_SHAPES[name])
