"""MART (Wang et al. 2020) with ENGM as the outer optimizer, on scikit-learn's digits.

    python examples/mart_digits.py                                     # 10 epochs, lambda = 5
    python examples/mart_digits.py --epochs 1 --max-train-examples 128 --max-test-examples 64 --pgd-steps 2

The loss is the MART repository's batch loss, the mean over examples of
BCE(f(x_adv_i), y_i) + lambda * KL(f(x_i) || f(x_adv_i)) * (1 - p_y(x_i)) (the boosted
cross-entropy with a margin term on the largest wrong class), x_adv from PGD-10 on the
cross-entropy. train_step runs its one ordinary loss.backward(); ENGM takes each example's
gradient g_i from that backward and weights it by 1/max(||g_i||, gamma). Prints clean and
PGD-20 accuracy on the test split.
"""

from __future__ import annotations

import argparse

import torch

from engm_opacus import make_engm
from engm_opacus.at import get_at_loss, train_step
from engm_opacus.training.data import limit, load_digits_splits, make_loader
from engm_opacus.training.evaluation import evaluate
from engm_opacus.training.models import small_cnn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--max-train-examples", type=int, default=None, help="train on the first N digits only")
    parser.add_argument("--max-test-examples", type=int, default=None, help="evaluate on the first N test digits only")
    parser.add_argument("--gamma", type=float, default=1.0, help="ENGM normalization floor")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--pgd-steps", type=int, default=10, help="training attack steps")
    parser.add_argument("--eval-pgd-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lam", type=float, default=5.0, help="MART KL weight (lambda)")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    data = load_digits_splits()
    train_loader = make_loader(
        limit(data.train, args.max_train_examples), 128, shuffle=True, generator=torch.Generator().manual_seed(args.seed)
    )
    test_loader = make_loader(limit(data.test, args.max_test_examples), 256, shuffle=False)

    model = small_cnn(num_classes=data.num_classes, in_channels=data.in_channels, norm="group")
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    model, optimizer = make_engm(model, optimizer, gamma=args.gamma)  # the ENGM line
    at_loss = get_at_loss("mart", lam=args.lam, eps=8 / 255, step_size=2 / 255, steps=args.pgd_steps)

    for epoch in range(1, args.epochs + 1):
        model.train()
        loss_sum = robust = seen = 0.0
        for x, y in train_loader:
            metrics = train_step(model, optimizer, at_loss, x, y)
            loss_sum += metrics.loss * metrics.batch_size
            robust += metrics.robust_correct
            seen += metrics.batch_size
        normalized = optimizer.last_step.fraction_above_gamma
        print(f"epoch {epoch}: train loss {loss_sum / seen:.3f}, train robust acc {robust / seen:.3f}, "
              f"normalized examples (last batch) {normalized:.0%}")

    result = evaluate(model, test_loader, eps=8 / 255, pgd_steps=args.eval_pgd_steps)
    print(f"test: clean accuracy {result['clean_acc']:.3f}, "
          f"PGD-{args.eval_pgd_steps} accuracy {result['pgd_acc']:.3f} ({result['n_examples']} examples)")


if __name__ == "__main__":
    main()
