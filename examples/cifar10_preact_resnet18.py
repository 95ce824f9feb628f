"""PGD-AT on CIFAR-10 with PreAct ResNet-18 (BatchNorm) and ENGM, the reference recipe.

    python examples/cifar10_preact_resnet18.py --data-dir ~/data            # 200 epochs, needs a GPU
    python examples/cifar10_preact_resnet18.py --data-dir ~/data --epochs 1 --max-train-examples 512

Needs the extracted official archive: DATA_DIR/cifar-10-batches-py/{data_batch_1..5,test_batch,
batches.meta}. This library never downloads; without the files the script exits with code 2 and
says where to put them.

Recipe (Rice et al. 2020): PGD-10 (eps 8/255, step 2/255) training attack, SGD momentum 0.9,
weight decay 5e-4, batch 128, lr 0.1 divided by 10 at 50% and 75% of the epochs; PGD-20 test.
The BatchNorm model trains in train mode with the ordinary mean loss and one loss.backward() per
step; ENGM takes each example's gradient g_i = B * dL/dtheta^(i) (its own parameter copy in the
true batch computation) from that backward and weights it by 1/max(||g_i||, gamma).
"""

from __future__ import annotations

import argparse
import sys

import torch

from engm_opacus import make_engm
from engm_opacus.at import get_at_loss, train_step
from engm_opacus.training.data import limit, load_dataset, make_loader
from engm_opacus.training.evaluation import evaluate
from engm_opacus.training.models import preact_resnet18


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="folder containing cifar-10-batches-py/")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--max-train-examples", type=int, default=None)
    parser.add_argument("--max-test-examples", type=int, default=None)
    parser.add_argument("--gamma", type=float, default=1.0, help="ENGM normalization floor")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    try:
        data = load_dataset("cifar10", args.data_dir, split_seed=args.seed)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    train_loader = make_loader(
        limit(data.train, args.max_train_examples), args.batch_size, shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    test_loader = make_loader(limit(data.test, args.max_test_examples), 256, shuffle=False)

    model = preact_resnet18(num_classes=data.num_classes, norm="batch").to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    total_steps = args.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [total_steps // 2, total_steps * 3 // 4], 0.1)
    model, optimizer = make_engm(model, optimizer, gamma=args.gamma)
    at_loss = get_at_loss("pgd-at", eps=8 / 255, step_size=2 / 255, steps=10)

    for epoch in range(1, args.epochs + 1):
        model.train()
        robust = seen = 0
        for x, y in train_loader:
            metrics = train_step(model, optimizer, at_loss, x.to(device), y.to(device))
            scheduler.step()
            robust += metrics.robust_correct
            seen += metrics.batch_size
        print(f"epoch {epoch}: train robust acc {robust / seen:.3f}, lr {scheduler.get_last_lr()[0]:.4g}")

    result = evaluate(model, test_loader, eps=8 / 255, pgd_steps=20, device=device)
    print(f"test: clean accuracy {result['clean_acc']:.3f}, PGD-20 accuracy {result['pgd_acc']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
