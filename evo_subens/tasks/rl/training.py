"""Training children and members of a policy: the RL task's
:class:`~evo_subens.families.base.ChildTrainer`, which runs PPO on the training episodes.

A family's tune section (``children.tune``) and the member fine-tuning section (``finetune``) are
:class:`~evo_subens.core.config.TrainConfig` sections written for SGD on a training split; for policies
they mean:

- ``epochs``: PPO batches. One epoch is one rollout of ``env.num_envs * ppo.num_steps`` transitions on
  training episodes (seeds from ``env.train_seed``, as for the parent), used for ``ppo.update_epochs``
  passes of ``ppo.num_minibatches`` minibatches, so ``epochs * env.num_envs * ppo.num_steps`` environment
  steps and ``epochs * ppo.update_epochs * num_minibatches`` optimiser steps (:func:`tuning_env_steps`,
  :meth:`PPOTrainer.steps`);
- ``lr``: Adam's peak learning rate (in place of ``ppo.lr``; PPO scale, e.g. 2.5e-4, not SGD's 0.1);
- ``lr_schedule``: stepped per optimiser step as for classification (constant, cosine, onecycle, step), in
  place of ``ppo.anneal_lr``;
- ``optimizer``: must be ``adam`` (PPO's Adam, eps 1e-5; the task refuses ``sgd``), with ``weight_decay``;
- ``batch_size``, ``momentum``, ``nesterov``: not used (minibatches come from ``ppo.num_minibatches``);
- ``bagging``: not supported (the task refuses it): training episodes are a stream, not a split to
  subsample.

Every other PPO setting (``gamma``, ``gae_lambda``, ``clip``, ``ent_coef``, ``vf_coef``,
``max_grad_norm``, ``norm_adv``) is the ``ppo`` section's. Tuning is a function of (weights, configs,
seed): the action draws and minibatch orders are seeded with the family's tuning seed and the episodes'
seeds are fixed, so a genome is tuned to the same weights in any process (on the CPU).

Masks of the sparse and stochastic families cover every Linear layer but the actor (``classifier``), so
the critic is pruned too unless ``children.layers`` spares it (e.g. ``["body.*"]``); while a stochastic
child's mask is annealed, the action logits are computed under the step's sampled mask and the values
with the critic unmasked (the mask is fixed, critic included, once annealing ends).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable

import numpy as np
import torch
from torch import nn

from ...core.config import TrainConfig
from ..classification.training import lr_factor
from .config import EnvConfig, PPOConfig
from .ppo import train_ppo, updates_and_steps


def tuning_ppo(env_cfg: EnvConfig, ppo_cfg: PPOConfig, cfg: TrainConfig) -> PPOConfig:
    """The PPO settings of a tuning or fine-tuning section ``cfg``: ``cfg.epochs`` batches at ``cfg.lr``."""
    batch = env_cfg.num_envs * ppo_cfg.num_steps
    return dataclasses.replace(ppo_cfg, total_steps=cfg.epochs * batch, lr=cfg.lr, anneal_lr=False)


def tuning_env_steps(env_cfg: EnvConfig, ppo_cfg: PPOConfig, cfg: TrainConfig) -> int:
    """Environment steps one tuning (or fine-tuning) with section ``cfg`` plays."""
    return cfg.epochs * env_cfg.num_envs * ppo_cfg.num_steps


class PPOTrainer:
    """Tunes a policy in place with PPO on the training episodes (see the module's docstring for what the
    section's fields mean). ``len(trainer)`` is the transitions of one tuning epoch (one PPO batch)."""

    def __init__(self, env_cfg: EnvConfig, ppo_cfg: PPOConfig):
        self.env_cfg = env_cfg
        self.ppo_cfg = ppo_cfg

    def __len__(self) -> int:
        return self.env_cfg.num_envs * self.ppo_cfg.num_steps

    def train(self, model: nn.Module, cfg: TrainConfig, *, seed: int,
              parameter_filter: Callable[[nn.Module], None] | None = None,
              forward: Callable[[nn.Module, torch.Tensor, int], torch.Tensor] | None = None,
              subset: np.ndarray | None = None) -> dict | None:
        """``cfg.epochs`` PPO batches on ``model``; ``parameter_filter`` after every optimiser step,
        ``forward(model, obs, step)`` for the action logits. Returns PPO's stats (None when epochs is 0)."""
        if subset is not None:
            raise ValueError("PPO tuning has no training split to subsample (children.tune.bagging is not "
                             "supported for policies)")
        if cfg.optimizer != "adam":
            raise ValueError(f"PPO tunes with Adam: optimizer 'adam' expected, not {cfg.optimizer!r}")
        if cfg.epochs == 0:
            return None
        stats = train_ppo(model, self.env_cfg, tuning_ppo(self.env_cfg, self.ppo_cfg, cfg), seed=seed,
                          progress=lambda line: None, after_step=parameter_filter, forward=forward,
                          schedule=partial(lr_factor, cfg.lr_schedule), weight_decay=cfg.weight_decay)
        model.eval()
        return stats

    def steps(self, cfg: TrainConfig, samples: int) -> int:
        """Optimiser steps :meth:`train` takes (``samples`` does not matter: PPO batches have one size)."""
        return updates_and_steps(self.env_cfg, tuning_ppo(self.env_cfg, self.ppo_cfg, cfg))[1]
