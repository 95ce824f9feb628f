"""What one training run trains with, built from its config: data loaders, model and its wrappers, optimizer, schedule, AT loss, precision.

One process: the model, ``make_engm(model, SGD)`` for ENGM (plain SGD for MSGD) and seeded
single-process loaders. Under ``torchrun`` (:mod:`engm_opacus.training.distributed`): the same
model on every rank inside ``DistributedDataParallel`` (then ``make_engm`` for ENGM), a
``DistributedSampler`` loader of ``batch_size / N`` examples per rank, validation and test shards,
and a per-rank seed for the training attack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from engm_opacus.at.losses import get_at_loss
from engm_opacus.training.amp import autocast_dtype, make_scaler
from engm_opacus.training.config import VARIANTS, TrainConfig
from engm_opacus.training.data import limit, load_dataset, make_loader
from engm_opacus.training.distributed import Distributed, data_parallel, per_rank_batch, rank_seed, shard, train_loader
from engm_opacus.training.models import build_model
from engm_opacus.training.runtime import seed_everything
from engm_opacus.wrap import make_engm


def lr_factor(schedule: str, epochs: int, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the base LR after ``t`` iterations (for ``torch.optim.lr_scheduler.LambdaLR``).

    ``piecewise``: 1 before 50% of the epochs, 0.1 before 75%, then 0.01.
    ``cosine``: ``0.5 (1 + cos(pi t / (epochs * steps_per_epoch)))``.
    """
    total = epochs * steps_per_epoch

    def piecewise(t: int) -> float:
        epoch = t / steps_per_epoch
        return 1.0 if epoch < 0.5 * epochs else 0.1 if epoch < 0.75 * epochs else 0.01

    def cosine(t: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))

    return piecewise if schedule == "piecewise" else cosine


@dataclass
class Run:
    """The objects one run trains with.

    Attributes:
        model: the plain model (checkpoints hold its ``state_dict``; evaluation uses it).
        trained_model: what the training step calls: ``model``, its ``DistributedDataParallel``
            wrapper, or the ENGM wrapper of either.
        dist: this process's place in the job (one process: ``Distributed()``).
        autocast_dtype, scaler: the training step's mixed precision (:mod:`engm_opacus.training.amp`).
    """

    model: nn.Module
    trained_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    at_loss: Any
    generator: torch.Generator
    train_loader: DataLoader
    val_loader: DataLoader
    test_loader: DataLoader
    dist: Distributed
    autocast_dtype: Optional[torch.dtype] = None
    scaler: Optional[torch.amp.GradScaler] = None

    def set_epoch(self, epoch: int) -> None:
        """Tell a ``DistributedSampler`` the epoch (its shuffle is ``seed + epoch``); no-op for one process."""
        if isinstance(self.train_loader.sampler, DistributedSampler):
            self.train_loader.sampler.set_epoch(epoch)


def engm_options_for(config: TrainConfig, at_loss: Any) -> Dict[str, Any]:
    """``config.engm_options``; for the input-norm variant without an explicit ``input_grad_source``: ``"attack"`` where
    the attack maximizes the training loss (PGD-AT, AWP-PGD-AT: the fast path), else ``"backward"`` (TRADES, MART: the
    attack's KL or CE gradient is not the training loss's; the study in ``benchmarks/input_norm_study.py`` measured
    its estimate far worse there); with the attack source, ``attack_loss_reduction="sum"``, as ``pgd_linf`` computes it."""
    options = dict(config.engm_options)
    if config.optimizer == "engm-input-norm":
        options.setdefault("input_grad_source", "attack" if at_loss.attack_loss_is_training_loss else "backward")
        if options["input_grad_source"] == "attack":
            options.setdefault("attack_loss_reduction", "sum")  # pgd_linf ascends the sum of the per-row objectives
    return options


def build_run(config: TrainConfig, device: torch.device, state: Distributed) -> Run:
    """Seed, load data, build the model (wrapped for data parallelism and ENGM), SGD, the schedule, the AT loss, AMP.

    Raises:
        ValueError: under ``torchrun``, a ``batch_size`` that does not split evenly over the processes;
            ``bf16`` on a GPU without bfloat16.
    """
    batch = per_rank_batch(config.batch_size, state.world_size)
    dtype = autocast_dtype(config.amp, device)
    seed_everything(config.seed)
    splits = load_dataset(config.dataset, config.data_dir, split_seed=0)
    model = build_model(
        config.model, num_classes=splits.num_classes, in_channels=splits.in_channels, norm=config.norm, width=config.width
    ).to(device)
    sgd = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=config.nesterov
    )
    trained_model: nn.Module = data_parallel(model, device) if state.enabled else model
    optimizer: torch.optim.Optimizer = sgd
    at_loss = get_at_loss(
        config.at_method, eps=config.eps, step_size=config.step_size, steps=config.pgd_steps,
        attack_eval_mode=config.attack_eval_mode, **config.at_options,
    )
    if config.uses_engm:
        trained_model, optimizer = make_engm(
            trained_model, sgd, gamma=config.gamma, variant=VARIANTS[config.optimizer], **engm_options_for(config, at_loss)
        )
    generator = torch.Generator().manual_seed(config.seed)
    train_set = limit(splits.train, config.max_train_examples)
    val_set, test_set = limit(splits.val, config.max_val_examples), limit(splits.test, config.max_test_examples)
    if state.enabled:
        loader = train_loader(train_set, batch, config.seed, state)
        val_set, test_set = shard(val_set, state), shard(test_set, state)
        if state.rank > 0:  # rank 0 keeps the one-process stream; the others draw other attack starts
            seed_everything(rank_seed(config.seed, state.rank))
    else:
        loader = make_loader(train_set, batch, shuffle=True, generator=generator)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config.schedule, config.epochs, len(loader)))
    return Run(
        model, trained_model, optimizer, scheduler, at_loss, generator, loader,
        make_loader(val_set, batch, shuffle=False), make_loader(test_set, batch, shuffle=False),
        state, dtype, make_scaler(config.amp, device, state.enabled),
    )
