"""TRADES in the style of Zhang et al.'s repository (trades.py + train_trades_cifar10.py), on digits.

    python examples/reference/trades_msgd.py     # the MSGD original
    python examples/reference/trades_engm.py     # the same script with ENGM
    python examples/reference/trades_engm.py --epochs 1 --max-train-examples 64 --num-steps 2 --width 8

The two files differ in two lines: ``from engm_opacus import make_engm`` and
``model, optimizer = make_engm(model, optimizer, gamma=1.0)``. Everything else is the
reference recipe: ``trades_loss`` attacks in eval mode by ``torch.autograd.grad`` on the KL
term from ``x + 0.001 N(0, 1)``, goes back to train mode, and returns
``loss_natural + beta * loss_robust`` with the KL summed and divided by the batch size
(``nn.KLDivLoss(size_average=False)`` in the original; ``reduction='sum'`` is the same);
then ``loss.backward(); optimizer.step()`` and the step-wise learning-rate decay.

Data: scikit-learn's 8x8 digits (pixels scaled to [0, 1]), 80/20 split; the model is the
repository's SmallCNN with padded convolutions for 8x8 inputs and ``--width`` channels.
"""

import argparse
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from sklearn.datasets import load_digits


class SmallCNN(nn.Module):
    def __init__(self, width=32, drop=0.5, num_channels=1, num_labels=10):
        super(SmallCNN, self).__init__()
        self.width = width
        activ = nn.ReLU(True)
        self.feature_extractor = nn.Sequential(OrderedDict([
            ('conv1', nn.Conv2d(num_channels, width, 3, padding=1)),
            ('relu1', activ),
            ('conv2', nn.Conv2d(width, width, 3, padding=1)),
            ('relu2', activ),
            ('maxpool1', nn.MaxPool2d(2, 2)),
            ('conv3', nn.Conv2d(width, 2 * width, 3, padding=1)),
            ('relu3', activ),
            ('conv4', nn.Conv2d(2 * width, 2 * width, 3, padding=1)),
            ('relu4', activ),
            ('maxpool2', nn.MaxPool2d(2, 2)),
        ]))
        self.classifier = nn.Sequential(OrderedDict([
            ('fc1', nn.Linear(2 * width * 2 * 2, 200)),
            ('relu1', activ),
            ('drop', nn.Dropout(drop)),
            ('fc2', nn.Linear(200, 200)),
            ('relu2', activ),
            ('fc3', nn.Linear(200, num_labels)),
        ]))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
        nn.init.constant_(self.classifier.fc3.weight, 0)
        nn.init.constant_(self.classifier.fc3.bias, 0)

    def forward(self, input):
        features = self.feature_extractor(input)
        logits = self.classifier(features.view(-1, 2 * self.width * 2 * 2))
        return logits


def trades_loss(model, x_natural, y, optimizer, step_size=0.003, epsilon=0.031, perturb_steps=10, beta=1.0):
    # define KL-loss
    criterion_kl = nn.KLDivLoss(reduction='sum')
    model.eval()
    batch_size = len(x_natural)
    # generate adversarial example
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape, device=x_natural.device).detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = criterion_kl(F.log_softmax(model(x_adv), dim=1),
                                   F.softmax(model(x_natural), dim=1))
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()

    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    # zero gradient
    optimizer.zero_grad()
    # calculate robust loss
    logits = model(x_natural)
    loss_natural = F.cross_entropy(logits, y)
    loss_robust = (1.0 / batch_size) * criterion_kl(F.log_softmax(model(x_adv), dim=1),
                                                    F.softmax(model(x_natural), dim=1))
    loss = loss_natural + beta * loss_robust
    return loss


def digits_loaders(batch_size, test_batch_size, max_train_examples=None, max_test_examples=None):
    """Digits as [N, 1, 8, 8] in [0, 1]: a fixed 80/20 train/test split, as DataLoaders."""
    digits = load_digits()
    X = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    n_train = int(0.8 * len(X))
    train, test = order[:n_train][:max_train_examples], order[n_train:][:max_test_examples]
    train_set = torch.utils.data.TensorDataset(X[train], y[train])
    test_set = torch.utils.data.TensorDataset(X[test], y[test])
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=test_batch_size, shuffle=False)
    return train_loader, test_loader


def train(args, model, device, train_loader, optimizer, epoch):
    model.train()
    for batch_idx, (data, target) in enumerate(train_loader):
        data, target = data.to(device), target.to(device)

        optimizer.zero_grad()

        # calculate robust loss
        loss = trades_loss(model=model,
                           x_natural=data,
                           y=target,
                           optimizer=optimizer,
                           step_size=args.step_size,
                           epsilon=args.epsilon,
                           perturb_steps=args.num_steps,
                           beta=args.beta)
        loss.backward()
        optimizer.step()

        # print progress
        if batch_idx % args.log_interval == 0:
            print('Train Epoch: {} [{}/{}]\tLoss: {:.6f}'.format(
                epoch, batch_idx * len(data), len(train_loader.dataset), loss.item()))


def eval_test(model, device, test_loader):
    model.eval()
    test_loss = 0
    correct = 0
    with torch.no_grad():
        for data, target in test_loader:
            data, target = data.to(device), target.to(device)
            output = model(data)
            test_loss += F.cross_entropy(output, target, reduction='sum').item()
            pred = output.max(1, keepdim=True)[1]
            correct += pred.eq(target.view_as(pred)).sum().item()
    test_loss /= len(test_loader.dataset)
    print('Test: Average loss: {:.4f}, Accuracy: {}/{} ({:.0f}%)'.format(
        test_loss, correct, len(test_loader.dataset), 100. * correct / len(test_loader.dataset)))


def _pgd_whitebox(model, X, y, epsilon, num_steps, step_size):
    X_pgd = X.detach() + torch.empty_like(X).uniform_(-epsilon, epsilon)
    for _ in range(num_steps):
        X_pgd.requires_grad_()
        with torch.enable_grad():
            loss = nn.CrossEntropyLoss()(model(X_pgd), y)
        grad = torch.autograd.grad(loss, [X_pgd])[0]
        X_pgd = X_pgd.detach() + step_size * grad.sign()
        X_pgd = torch.min(torch.max(X_pgd, X - epsilon), X + epsilon).clamp(0.0, 1.0)
    return (model(X_pgd).max(1)[1] == y).sum().item()


def eval_adv_test_whitebox(model, device, test_loader, args):
    model.eval()
    robust = 0
    for data, target in test_loader:
        data, target = data.to(device), target.to(device)
        robust += _pgd_whitebox(model, data, target, args.epsilon, args.eval_num_steps, args.step_size)
    print('PGD-{} robust accuracy: {}/{} ({:.0f}%)'.format(
        args.eval_num_steps, robust, len(test_loader.dataset), 100. * robust / len(test_loader.dataset)))


def adjust_learning_rate(optimizer, epoch, args):
    """decrease the learning rate (the reference: at epochs 75 and 90 of 100)"""
    lr = args.lr
    if epoch >= 0.75 * args.epochs:
        lr = args.lr * 0.1
    if epoch >= 0.9 * args.epochs:
        lr = args.lr * 0.01
    for param_group in optimizer.param_groups:
        param_group['lr'] = lr


def main():
    parser = argparse.ArgumentParser(description='TRADES adversarial training on digits')
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--test-batch-size', type=int, default=256)
    parser.add_argument('--epochs', type=int, default=30)
    parser.add_argument('--weight-decay', '--wd', default=2e-4, type=float)
    parser.add_argument('--lr', type=float, default=0.1)
    parser.add_argument('--momentum', type=float, default=0.9)
    parser.add_argument('--epsilon', default=0.031, type=float, help='perturbation')
    parser.add_argument('--num-steps', default=10, type=int, help='perturb number of steps')
    parser.add_argument('--eval-num-steps', default=20, type=int)
    parser.add_argument('--step-size', default=0.007, type=float, help='perturb step size')
    parser.add_argument('--beta', default=6.0, type=float, help='regularization, i.e., 1/lambda in TRADES')
    parser.add_argument('--width', default=32, type=int, help='channels of the first convolutions')
    parser.add_argument('--max-train-examples', default=None, type=int)
    parser.add_argument('--max-test-examples', default=None, type=int)
    parser.add_argument('--seed', type=int, default=1)
    parser.add_argument('--log-interval', type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    train_loader, test_loader = digits_loaders(args.batch_size, args.test_batch_size,
                                               args.max_train_examples, args.max_test_examples)

    model = SmallCNN(width=args.width).to(device)
    optimizer = optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)

    for epoch in range(1, args.epochs + 1):
        # adjust learning rate for SGD
        adjust_learning_rate(optimizer, epoch, args)

        # adversarial training
        train(args, model, device, train_loader, optimizer, epoch)

        # evaluation on natural examples
        print('================================================================')
        eval_test(model, device, test_loader)
        print('================================================================')

    eval_adv_test_whitebox(model, device, test_loader, args)


if __name__ == '__main__':
    main()
