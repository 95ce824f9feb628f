"""Your own adversarial-training loss under ENGM: adversarial logit pairing as an example.

    python examples/custom_loss.py
    python examples/custom_loss.py --epochs 1 --max-train-examples 128 --max-test-examples 64 --pgd-steps 2

Write the loss as you would for MSGD: one mean-reduced scalar over the batch. ENGM takes each
example's gradient g_i from the ordinary loss.backward() of that scalar and weights it by
1/max(||g_i||, gamma); nobody needs per-example losses. Any callable with a ``name`` and the
signature ``loss(model, x, y) -> ATLossOutput`` (the ``ATLoss`` protocol) works with
``train_step``. Here: L = (1/B) sum_i [CE(f(x_adv_i), y_i) + weight * ||f(x_i) - f(x_adv_i)||^2]
(adversarial logit pairing, Kannan et al. 2018) with x_adv from PGD on the cross-entropy.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from engm_opacus import make_engm
from engm_opacus.at import ATLoss, ATLossOutput, pgd_linf, train_step
from engm_opacus.training.data import limit, load_digits_splits, make_loader
from engm_opacus.training.evaluation import evaluate
from engm_opacus.training.models import small_cnn


class LogitPairing:
    """``L = (1/B) sum_i [CE(f(x_adv_i), y_i) + weight * ||f(x_i) - f(x_adv_i)||_2^2]`` with PGD-CE adversarial examples."""

    name = "logit-pairing"

    def __init__(self, weight: float = 0.5, eps: float = 8 / 255, step_size: float = 2 / 255, steps: int = 10):
        self.weight, self.eps, self.step_size, self.steps = weight, eps, step_size, steps

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> ATLossOutput:
        x_adv = pgd_linf(model, x, y, eps=self.eps, step_size=self.step_size, steps=self.steps)
        logits_adv, logits = model(x_adv), model(x)
        loss = F.cross_entropy(logits_adv, y) + self.weight * (logits - logits_adv).pow(2).sum(1).mean()
        return ATLossOutput(loss=loss, x_adv=x_adv, logits_adv=logits_adv.detach(), logits_clean=logits.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--max-train-examples", type=int, default=None)
    parser.add_argument("--max-test-examples", type=int, default=None)
    parser.add_argument("--gamma", type=float, default=1.0)
    parser.add_argument("--pgd-steps", type=int, default=10)
    parser.add_argument("--eval-pgd-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    data = load_digits_splits()
    train_loader = make_loader(
        limit(data.train, args.max_train_examples), 128, shuffle=True, generator=torch.Generator().manual_seed(args.seed)
    )
    model = small_cnn(num_classes=data.num_classes, in_channels=data.in_channels, norm="group")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    model, optimizer = make_engm(model, optimizer, gamma=args.gamma)
    at_loss = LogitPairing(steps=args.pgd_steps)
    assert isinstance(at_loss, ATLoss)  # the protocol train_step relies on

    for epoch in range(1, args.epochs + 1):
        model.train()
        clean = seen = 0
        for x, y in train_loader:
            metrics = train_step(model, optimizer, at_loss, x, y)
            clean += metrics.clean_correct
            seen += metrics.batch_size
        print(f"epoch {epoch}: train clean acc {clean / seen:.3f}, loss {metrics.loss:.3f}")

    test_loader = make_loader(limit(data.test, args.max_test_examples), 256, shuffle=False)
    result = evaluate(model, test_loader, eps=8 / 255, pgd_steps=args.eval_pgd_steps)
    print(f"test: clean accuracy {result['clean_acc']:.3f}, PGD-{args.eval_pgd_steps} accuracy {result['pgd_acc']:.3f}")


if __name__ == "__main__":
    main()
