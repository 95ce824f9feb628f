"""Each file dataset's real reader feeds one ENGM adversarial-training step; ``engm-opacus train --dataset tinyimagenet`` end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engm_opacus import make_engm
from engm_opacus.at.losses import get_at_loss
from engm_opacus.at.step import train_step
from engm_opacus.cli import main
from engm_opacus.training.checkpoints import load_trained_model
from engm_opacus.training.data import load_dataset, make_loader
from engm_opacus.training.models import build_model
from tests.training.fake_data import write_fake_cifar10, write_fake_cifar100, write_fake_tinyimagenet

pytestmark = pytest.mark.usefixtures("one_thread")

WRITERS = {
    "cifar10": lambda root: write_fake_cifar10(root, 8),
    "cifar100": lambda root: write_fake_cifar100(root, 40, 8),
    "tinyimagenet": lambda root: write_fake_tinyimagenet(root, per_class=1, val=4),
}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_one_engm_pgd_at_step_on_the_real_reader(tmp_path: Path, name: str) -> None:
    """Loader batch -> PreAct ResNet-18 (width 4) wrapped by make_engm -> train_step (PGD-AT, eps 8/255): the weights move."""
    WRITERS[name](tmp_path)
    splits = load_dataset(name, str(tmp_path), verify_md5=False)
    x, y = next(iter(make_loader(splits.train, 4, shuffle=True, generator=torch.Generator().manual_seed(0))))
    assert x.shape == (4, 3, splits.image_size, splits.image_size) and y.dtype == torch.int64
    torch.manual_seed(0)
    model = build_model("preact-resnet18", num_classes=splits.num_classes, in_channels=splits.in_channels, norm="group", width=4)
    wrapped, optimizer = make_engm(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), gamma=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    metrics = train_step(wrapped, optimizer, get_at_loss("pgd-at", eps=8 / 255, step_size=2 / 255, steps=1), x, y)
    assert metrics.batch_size == 4 and torch.isfinite(torch.tensor(metrics.loss))
    norms = optimizer.last_step.per_example_norms
    assert norms.shape == (4,) and bool(torch.isfinite(norms).all())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_cli_trains_on_a_generated_tinyimagenet_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``engm-opacus train --dataset tinyimagenet --data-dir TREE --epochs 1`` with tiny settings: exit 0, a checkpoint, test accuracy."""
    write_fake_tinyimagenet(tmp_path / "data", per_class=1, val=4)
    out = tmp_path / "run"
    argv = [
        "train", "--dataset", "tinyimagenet", "--data-dir", str(tmp_path / "data"), "--epochs", "1",
        "--max-train-examples", "8", "--max-val-examples", "4", "--max-test-examples", "4", "--batch-size", "4",
        "--width", "4", "--pgd-steps", "1", "--val-pgd-steps", "1", "--test-pgd-steps", "1", "--out-dir", str(out),
        "--no-progress",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    checkpoints = sorted(out.glob("*.pt"))
    assert checkpoints
    model, config, _ = load_trained_model(checkpoints[0], torch.device("cpu"))  # rebuilt with DATASET_SHAPES: 200 classes
    assert config.dataset == "tinyimagenet" and config.data_dir == str(tmp_path / "data")
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 200)
