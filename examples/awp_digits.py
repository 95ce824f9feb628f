"""AWP (Wu et al. 2020) on top of PGD-AT, with ENGM as the outer optimizer, on scikit-learn's digits.

    python examples/awp_digits.py                                      # 10 epochs, gamma_awp = 5e-3
    python examples/awp_digits.py --epochs 1 --max-train-examples 128 --max-test-examples 64 --pgd-steps 2

Per step: PGD-10 adversarial examples at the weights w; an adversarial weight perturbation v
(layer-wise, ||v_W|| = gamma_awp * ||W||); the mean PGD-AT loss at w + v and its one backward, from
which ENGM takes each example's gradient g_i and weights it by 1/max(||g_i||, gamma); the step;
then v is removed (train_step does this).
Use --inner trades for AWP on TRADES. Prints clean and PGD-20 accuracy on the test split.
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
    parser.add_argument("--gamma-awp", type=float, default=5e-3, help="relative weight-perturbation size")
    parser.add_argument("--inner", choices=("pgd-at", "trades"), default="pgd-at", help="the AT method AWP wraps")
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
    at_loss = get_at_loss(f"awp-{args.inner}", gamma_awp=args.gamma_awp, eps=8 / 255, step_size=2 / 255, steps=args.pgd_steps)

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
