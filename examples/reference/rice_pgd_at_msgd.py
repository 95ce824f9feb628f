"""PGD-AT in the style of Rice et al.'s train_cifar.py ("Overfitting in adversarially robust deep learning"), on digits.

    python examples/reference/rice_pgd_at_msgd.py     # the MSGD original
    python examples/reference/rice_pgd_at_engm.py     # the same script with ENGM
    python examples/reference/rice_pgd_at_engm.py --epochs 1 --max-train-examples 64 --width 8 --attack-iters 2

The two files differ in two lines: ``from engm_opacus import make_engm`` and
``model, opt = make_engm(model, opt, gamma=1.0)``. Everything else is the reference recipe:
a PreAct ResNet-18 with BatchNorm (``out += shortcut``), the normalization inside the forward
call, PGD by ``loss.backward()`` and ``delta.grad`` in train mode (the attack's backward
accumulates into ``p.grad``; ``opt.zero_grad()`` before the training backward clears it),
``robust_loss.backward(); opt.step()``, a piecewise learning rate updated every iteration,
and a forward on clean inputs after the step for the statistics.

Data: scikit-learn's 8x8 digits (pixels scaled to [0, 1]), 80/20 split; ``--width`` is the
first stage's channel count (64 in the reference) and the final pooling is global average
pooling (the reference's ``avg_pool2d(out, 4)`` assumes 32x32 inputs).
"""

import argparse

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super(PreActBlock, self).__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)

        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False)
            )

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, 'shortcut') else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out += shortcut
        return out


class PreActResNet(nn.Module):
    def __init__(self, block, num_blocks, num_classes=10, width=64, in_channels=3):
        super(PreActResNet, self).__init__()
        self.in_planes = width

        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(block, width, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 2 * width, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, num_blocks[3], stride=2)
        self.bn = nn.BatchNorm2d(8 * width * block.expansion)
        self.linear = nn.Linear(8 * width * block.expansion, num_classes)

    def _make_layer(self, block, planes, num_blocks, stride):
        strides = [stride] + [1] * (num_blocks - 1)
        layers = []
        for stride in strides:
            layers.append(block(self.in_planes, planes, stride))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.conv1(x)
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = self.layer4(out)
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1)
        out = out.view(out.size(0), -1)
        out = self.linear(out)
        return out


def PreActResNet18(num_classes=10, width=64, in_channels=3):
    return PreActResNet(PreActBlock, [2, 2, 2, 2], num_classes=num_classes, width=width, in_channels=in_channels)


upper_limit, lower_limit = 1, 0


def clamp(X, lower_limit, upper_limit):
    return torch.max(torch.min(X, upper_limit), lower_limit)


def digits_splits(device, max_train_examples=None, max_test_examples=None):
    """Digits as [N, 1, 8, 8] tensors in [0, 1]: a fixed 80/20 train/test split."""
    digits = load_digits()
    X = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    n_train = int(0.8 * len(X))
    train, test = order[:n_train][:max_train_examples], order[n_train:][:max_test_examples]
    return (X[train].to(device), y[train].to(device)), (X[test].to(device), y[test].to(device))


def batches(X, y, batch_size, shuffle):
    order = torch.randperm(len(X), device=X.device) if shuffle else torch.arange(len(X), device=X.device)
    for start in range(0, len(X), batch_size):
        index = order[start:start + batch_size]
        yield X[index], y[index]


def attack_pgd(model, normalize, X, y, epsilon, alpha, attack_iters, restarts):
    max_loss = torch.zeros(y.shape[0], device=X.device)
    max_delta = torch.zeros_like(X)
    for _ in range(restarts):
        delta = torch.zeros_like(X)
        delta.uniform_(-epsilon, epsilon)
        delta = clamp(delta, lower_limit - X, upper_limit - X)
        delta.requires_grad_()
        for _ in range(attack_iters):
            output = model(normalize(X + delta))
            loss = F.cross_entropy(output, y)
            loss.backward()
            grad = delta.grad.detach()
            d = torch.clamp(delta + alpha * torch.sign(grad), min=-epsilon, max=epsilon)
            d = clamp(d, lower_limit - X, upper_limit - X)
            delta.data = d
            delta.grad.zero_()
        all_loss = F.cross_entropy(model(normalize(X + delta)), y, reduction='none')
        max_delta[all_loss >= max_loss] = delta.detach()[all_loss >= max_loss]
        max_loss = torch.max(max_loss, all_loss)
    return max_delta


def get_args():
    parser = argparse.ArgumentParser()
    parser.add_argument('--batch-size', default=128, type=int)
    parser.add_argument('--epochs', default=30, type=int)
    parser.add_argument('--lr-max', default=0.1, type=float)
    parser.add_argument('--epsilon', default=8, type=int)
    parser.add_argument('--attack-iters', default=10, type=int)
    parser.add_argument('--restarts', default=1, type=int)
    parser.add_argument('--pgd-alpha', default=2, type=float)
    parser.add_argument('--width', default=16, type=int, help='channels of the first stage (64 in the reference)')
    parser.add_argument('--max-train-examples', default=None, type=int)
    parser.add_argument('--max-test-examples', default=None, type=int)
    parser.add_argument('--seed', default=0, type=int)
    return parser.parse_args()


def main():
    args = get_args()
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    (train_X, train_y), (test_X, test_y) = digits_splits(device, args.max_train_examples, args.max_test_examples)
    mu, std = train_X.mean(), train_X.std()

    def normalize(X):
        return (X - mu) / std

    epsilon = (args.epsilon / 255.)
    pgd_alpha = (args.pgd_alpha / 255.)

    model = PreActResNet18(num_classes=10, width=args.width, in_channels=1).to(device)
    model.train()

    opt = torch.optim.SGD(model.parameters(), lr=args.lr_max, momentum=0.9, weight_decay=5e-4)

    criterion = nn.CrossEntropyLoss()

    def lr_schedule(t):
        if t / args.epochs < 0.5:
            return args.lr_max
        elif t / args.epochs < 0.75:
            return args.lr_max / 10.
        else:
            return args.lr_max / 100.

    n_batches = (len(train_X) + args.batch_size - 1) // args.batch_size
    for epoch in range(args.epochs):
        model.train()
        train_loss = train_acc = train_robust_loss = train_robust_acc = train_n = 0
        for i, (X, y) in enumerate(batches(train_X, train_y, args.batch_size, shuffle=True)):
            lr = lr_schedule(epoch + (i + 1) / n_batches)
            opt.param_groups[0].update(lr=lr)

            delta = attack_pgd(model, normalize, X, y, epsilon, pgd_alpha, args.attack_iters, args.restarts)
            delta = delta.detach()

            robust_output = model(normalize(torch.clamp(X + delta[:X.size(0)], min=lower_limit, max=upper_limit)))
            robust_loss = criterion(robust_output, y)

            opt.zero_grad()
            robust_loss.backward()
            opt.step()

            output = model(normalize(X))
            loss = criterion(output, y)

            train_robust_loss += robust_loss.item() * y.size(0)
            train_robust_acc += (robust_output.max(1)[1] == y).sum().item()
            train_loss += loss.item() * y.size(0)
            train_acc += (output.max(1)[1] == y).sum().item()
            train_n += y.size(0)

        model.eval()
        test_acc = test_robust_acc = test_n = 0
        for X, y in batches(test_X, test_y, args.batch_size, shuffle=False):
            delta = attack_pgd(model, normalize, X, y, epsilon, pgd_alpha, args.attack_iters, args.restarts)
            delta = delta.detach()

            robust_output = model(normalize(torch.clamp(X + delta[:X.size(0)], min=lower_limit, max=upper_limit)))
            output = model(normalize(X))

            test_robust_acc += (robust_output.max(1)[1] == y).sum().item()
            test_acc += (output.max(1)[1] == y).sum().item()
            test_n += y.size(0)

        print(f'epoch {epoch + 1}: lr {lr:.4f}, train loss {train_loss / train_n:.4f}, '
              f'train acc {train_acc / train_n:.4f}, train robust loss {train_robust_loss / train_n:.4f}, '
              f'train robust acc {train_robust_acc / train_n:.4f}, test acc {test_acc / test_n:.4f}, '
              f'test robust acc {test_robust_acc / test_n:.4f}')


if __name__ == '__main__':
    main()
