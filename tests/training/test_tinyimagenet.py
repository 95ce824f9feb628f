"""TinyImageNet: the ImageFolder-based reader on a generated tree of the official layout, its layout errors, the 64x64/200-class model."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch

from engm_opacus.training.data import DATASET_SHAPES, load_dataset
from engm_opacus.training.models import build_model
from tests.training.fake_data import fake_wnids, write_fake_tinyimagenet


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One generated tree (200 classes x 2 training JPEGs, 10 annotated val JPEGs), read-only for the tests below."""
    return write_fake_tinyimagenet(tmp_path_factory.mktemp("tin"), per_class=2, val=10)


def test_splits_shapes_and_labels(tree: Path) -> None:
    splits = load_dataset("tinyimagenet", str(tree))
    assert (splits.num_classes, splits.in_channels, splits.image_size) == DATASET_SHAPES["tinyimagenet"] == (200, 3, 64)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (360, 40, 10)  # 400 training images, 10% held out
    assert sorted(list(splits.train.indices) + list(splits.val.indices)) == list(range(400))
    wnids = sorted(fake_wnids())
    # labels are indices of the sorted wnids, for train/ (ImageFolder) and val/ (val_annotations.txt) alike
    folder = splits.train.dataset.base
    assert folder.classes == wnids and folder.samples[0][0].endswith(f"{wnids[0]}_0.JPEG")
    annotations = (tree / "tiny-imagenet-200" / "val" / "val_annotations.txt").read_text().splitlines()
    expected = [wnids.index(line.split("\t")[1]) for line in annotations]
    assert [splits.test[i][1] for i in range(len(splits.test))] == expected
    for dataset in (splits.train, splits.val, splits.test):
        x, y = dataset[0]
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and 0.0 <= float(x.min()) <= float(x.max()) <= 1.0
        assert isinstance(y, int) and 0 <= y < 200


def test_grayscale_jpegs_become_rgb_and_only_training_images_are_augmented(tree: Path) -> None:
    splits = load_dataset("tinyimagenet", str(tree))
    base = splits.val.dataset
    gray = base[0][0]  # the first class's JPEGs are grayscale: three equal channels
    assert gray.shape == (3, 64, 64) and torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert torch.equal(splits.val[0][0], splits.val[0][0]) and torch.equal(splits.test[3][0], splits.test[3][0])
    torch.manual_seed(0)
    crops = [splits.train[5][0] for _ in range(4)]
    assert not all(torch.equal(crops[0], crop) for crop in crops[1:])


def test_data_dir_may_be_the_tiny_imagenet_folder_itself(tree: Path) -> None:
    a = load_dataset("tinyimagenet", str(tree))
    b = load_dataset("tinyimagenet", str(tree / "tiny-imagenet-200"))
    assert a.train.indices == b.train.indices and len(a.test) == len(b.test)


def _remove(relative: str) -> Callable[[Path], None]:
    def edit(base: Path) -> None:
        target = base / relative
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    return edit


def _rewrite(relative: str, change: Callable[[str], str]) -> Callable[[Path], None]:
    def edit(base: Path) -> None:
        (base / relative).write_text(change((base / relative).read_text()))

    return edit


FIRST = fake_wnids()[0]
PARTIAL = {
    "no wnids.txt": (_remove("wnids.txt"), "wnids.txt is missing"),
    "no val annotations": (_remove("val/val_annotations.txt"), "val_annotations.txt is missing"),
    "no val images": (_remove("val/images"), "images is missing"),
    "no train folder": (_remove("train"), "train is missing"),
    "a class folder missing": (_remove(f"train/{FIRST}"), f"lacks train/{FIRST}/images \\(1 of 200"),
    "a class folder empty": (_remove(f"train/{FIRST}/images/{FIRST}_0.JPEG"), "Found no valid file"),
    "an annotated image missing": (_remove("val/images/val_3.JPEG"), "line 4 names val_3.JPEG"),
    "an unknown wnid": (_rewrite("val/val_annotations.txt", lambda t: t.replace(FIRST, "n99999999", 1)), "'n99999999'"),
    "a truncated wnids.txt": (_rewrite("wnids.txt", lambda t: "\n".join(t.splitlines()[:-1])), "lists 199 wnids"),
    "a malformed annotation": (_rewrite("val/val_annotations.txt", lambda t: "oops\n" + t), "line 1 is not"),
}


@pytest.mark.parametrize("case", sorted(PARTIAL))
def test_partial_trees_name_the_problem_and_the_layout(tmp_path: Path, case: str) -> None:
    write_fake_tinyimagenet(tmp_path, per_class=1, val=6)
    edit, problem = PARTIAL[case]
    if case == "a class folder empty":
        (tmp_path / "tiny-imagenet-200" / "train" / FIRST / "images" / "extra").mkdir()  # still a folder, no image
    edit(tmp_path / "tiny-imagenet-200")
    with pytest.raises(FileNotFoundError, match=problem) as info:
        load_dataset("tinyimagenet", str(tmp_path))
    message = str(info.value)
    assert "expected layout DATA_DIR/tiny-imagenet-200/{wnids.txt" in message and "val/val_annotations.txt" in message
    assert "tiny-imagenet-200.zip" in message and "--data-dir" in message


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", ["preact-resnet18", "small-cnn"])
def test_models_take_64x64_inputs_and_200_classes(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=200, in_channels=3, width=4)
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 200)


def test_preact_resnet18_for_tinyimagenet_keeps_the_cifar_stem() -> None:
    """3x3 stride-1 stem, 8x8 final map, global average pool, Linear(512, 200): 11,172,170 + 190 * 513 parameters."""
    with torch.device("meta"):
        model = build_model("preact-resnet18", num_classes=200, in_channels=3, norm="batch")
    assert sum(p.numel() for p in model.parameters()) == 11_172_170 + 190 * 513 == 11_269_640
    assert model.conv1.stride == (1, 1) and model.conv1.kernel_size == (3, 3)
    assert (model.linear.in_features, model.linear.out_features) == (512, 200)
    small = build_model("preact-resnet18", num_classes=200, in_channels=3, width=2)
    assert small.layers(small.conv1(torch.rand(1, 3, 64, 64))).shape == (1, 16, 8, 8)
