"""SGD training (parent, children and member fine-tuning) and batched prediction."""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import TrainConfig
from .splits import Split
from .streaming import LazyInputs, batch_slices, input_batches


def lr_factor(schedule: str, step: int, total_steps: int, *, cycles: int = 1, low: float = 0.0) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based) of ``total_steps``, stepped per batch.

    ``onecycle`` is the two-phase cosine of Prune and Tune: warm-up over the first 10% from lr/100 to lr,
    then cosine decay to about 1e-7 * lr. The cyclic schedules split the steps into ``cycles`` equal
    cycles: ``cyclic_cosine`` restarts a cosine decay from 1 at each (snapshot ensembles, Huang et al.
    2017); ``cyclic_linear`` goes linearly from 1 to ``low`` at mid-cycle and back to 1 (fast geometric
    ensembling, Garipov et al. 2018).
    """
    progress = step / max(1, total_steps)
    if schedule in ("cyclic_cosine", "cyclic_linear"):
        cycle_steps = math.ceil(max(1, total_steps) / cycles)
        t = (step % cycle_steps) / cycle_steps
        if schedule == "cyclic_cosine":
            return 0.5 * (1.0 + math.cos(math.pi * t))
        return 1 - 2 * t * (1 - low) if t < 0.5 else low + (2 * t - 1) * (1 - low)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        return 0.1 ** int(progress * 3)  # /10 after one third and after two thirds
    if schedule == "onecycle":
        warm = 0.1
        if progress < warm:
            start = 0.01
            return start + (1 - start) * 0.5 * (1 - math.cos(math.pi * progress / warm))
        end = 1e-7
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * (progress - warm) / (1 - warm)))
    raise ValueError(f"unknown lr schedule {schedule!r}")


def training_steps(cfg: TrainConfig, samples: int) -> int:
    """Optimiser steps :func:`train` takes on ``samples`` training samples."""
    return cfg.epochs * math.ceil(samples / cfg.batch_size)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov, weight decay) or Adam (weight decay), as ``cfg.optimizer`` says."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                           nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)


def train(model: nn.Module, data: Split, cfg: TrainConfig, *, seed: int,
          on_epoch: Callable[[int, float, float], None] | None = None,
          parameter_filter: Callable[[nn.Module], None] | None = None,
          forward: Callable[[nn.Module, torch.Tensor, int], torch.Tensor] | None = None,
          schedule: Callable[[int, int], float] | None = None, augment: bool = False,
          criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy) -> None:
    """Train ``model`` in place on ``data`` for ``cfg.epochs`` epochs.

    Batches are drawn from a generator seeded with ``seed``, so training is a function of its inputs;
    streamed inputs are read batch by batch (the same batches, so the same result as in memory).
    ``augment``: each image batch is randomly cropped and flipped (:func:`augment_batch`, seeded by ``seed``).
    ``on_epoch(epoch, mean_loss, seconds)`` reports progress; ``parameter_filter(model)`` runs after every
    optimiser step (families with fixed masks re-apply them there); ``forward(model, x, step)`` replaces
    ``model(x)`` for the training logits (families that sample a mask per step use it);
    ``schedule(step, total_steps)`` replaces ``lr_factor(cfg.lr_schedule, ...)`` (cyclic schedules);
    ``criterion(logits, labels)`` replaces the cross-entropy (packed ensembles sum their members' losses).
    """
    if cfg.epochs == 0:
        return
    optimizer = make_optimizer(model, cfg)
    n = len(data)
    total_steps = training_steps(cfg, n)

    def batch_order() -> Iterator[torch.Tensor]:
        """Every epoch's batches (sample indices), drawn from a generator seeded with ``seed``."""
        generator = torch.Generator().manual_seed(seed)
        for _ in range(cfg.epochs):
            yield from torch.randperm(n, generator=generator).split(cfg.batch_size)

    # One pass over all epochs' batches, so a streamed split's DataLoader starts its workers once; the loop
    # takes each batch's indices (for its labels) from the same order, as the reader runs ahead of it.
    order, ahead = itertools.tee(batch_order())
    inputs = input_batches(data.x, ahead)
    augmenter = torch.Generator().manual_seed(augment_seed(seed)) if augment else None
    step = 0
    device = next(model.parameters()).device
    model.train()
    for epoch in range(cfg.epochs):
        started = time.perf_counter()
        loss_sum = 0.0
        for _ in range(math.ceil(n / cfg.batch_size)):
            index = next(order)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * (lr_factor(cfg.lr_schedule, step, total_steps) if schedule is None
                                        else schedule(step, total_steps))
            x = next(inputs)
            if augmenter is not None:
                x = augment_batch(x, augmenter)
            x = x.to(device)
            logits = model(x) if forward is None else forward(model, x, step)
            loss = criterion(logits, data.y[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if parameter_filter is not None:
                parameter_filter(model)
            loss_sum += loss.item() * len(index)
            step += 1
        if on_epoch is not None:
            on_epoch(epoch, loss_sum / n, time.perf_counter() - started)
    model.eval()


AUGMENT_PADDING = 4


def augment_seed(seed: int) -> int:
    """The augmentation stream of training seed ``seed``, apart from its batch-order stream."""
    return int.from_bytes(hashlib.sha256(f"augment:{seed}".encode()).digest()[:8], "little") >> 1


def augment_batch(x: torch.Tensor, generator: torch.Generator, padding: int = AUGMENT_PADDING) -> torch.Tensor:
    """Standard image augmentation of a (batch, channels, height, width) batch: each image padded with
    ``padding`` zeros on every side, cropped back to its size at a random offset, and flipped left-right
    with probability 1/2 (random crop and horizontal flip, as for CIFAR)."""
    if x.dim() != 4:
        raise ValueError(f"augmentation needs (batch, channels, height, width) images, got shape {tuple(x.shape)}")
    n, _, height, width = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = dy[:, None] + torch.arange(height)[None, :]
    cols = dx[:, None] + torch.arange(width)[None, :]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n)[:, None, None, None]
    channel = torch.arange(x.shape[1])[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


class SplitTrainer:
    """The classification task's :class:`~evo_subens.families.base.ChildTrainer`: :func:`train` on a
    training split (families that train children tune them with it)."""

    def __init__(self, data: Split, augment: bool = False):
        self.data = data
        self.augment = augment

    def __len__(self) -> int:
        return len(self.data)

    def train(self, model: nn.Module, cfg: TrainConfig, *, seed: int,
              parameter_filter: Callable[[nn.Module], None] | None = None,
              forward: Callable[[nn.Module, torch.Tensor, int], torch.Tensor] | None = None,
              subset: np.ndarray | None = None) -> None:
        """:func:`train` on the split, or on its samples ``subset`` (indices)."""
        data = self.data if subset is None else self.data.subset(np.asarray(subset))
        train(model, data, cfg, seed=seed, parameter_filter=parameter_filter, forward=forward, augment=self.augment)

    def steps(self, cfg: TrainConfig, samples: int) -> int:
        return training_steps(cfg, samples)


@torch.inference_mode()
def predict_logits(model: nn.Module, x: torch.Tensor | LazyInputs, batch_size: int = 1000) -> torch.Tensor:
    """Logits of ``model`` on ``x`` (evaluation mode), computed in batches on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    batches = input_batches(x, batch_slices(len(x), batch_size))
    return torch.cat([model(batch.to(device, non_blocking=True)).float() for batch in batches]).cpu()


def predict_probs(model: nn.Module, x: torch.Tensor | LazyInputs, batch_size: int = 1000) -> torch.Tensor:
    """Softmax probabilities of ``model`` on ``x``."""
    return predict_logits(model, x, batch_size).softmax(dim=1)



def predict_with_features(model: nn.Module, x: torch.Tensor,
                          batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities and penultimate features (the final classifier layer's inputs) in one pass."""
    from .models import classifier_inputs

    with classifier_inputs(model, lambda t: t.float().cpu()) as captured:
        probs = predict_probs(model, x, batch_size)
    return probs, torch.cat(captured)


def predict_members(model: nn.Module, states: list[dict[str, torch.Tensor]], x: torch.Tensor,
                    batch_size: int = 1000, *, features: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Probabilities and penultimate features on ``x`` of each weight set in ``states``, loaded in turn into
    ``model`` (one model, weights swapped in); ``features=False`` skips capturing the features (empty list)."""
    probs, captured = [], []
    for state in states:
        model.load_state_dict(state)
        if features:
            member_probs, member_features = predict_with_features(model, x, batch_size)
            captured.append(member_features)
        else:
            member_probs = predict_probs(model, x, batch_size)
        probs.append(member_probs)
    return probs, captured

