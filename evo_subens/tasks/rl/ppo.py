"""Proximal Policy Optimisation, in one file read top to bottom (after CleanRL's ``ppo.py``).

:func:`train_ppo` trains a policy in place: a parent from scratch, or an existing policy for a few steps
(a pruned child, re-applying its mask after every optimiser step through ``after_step``; a child whose mask
is sampled per step, through ``forward``). One batch is
``num_envs * num_steps`` transitions from :class:`~.envs.SeededVectorEnv`, whose training episodes start
from the seeds ``EnvConfig.train_seed`` names; advantages are GAE(lambda); each batch is used for
``update_epochs`` passes of ``num_minibatches`` clipped-surrogate steps.

Randomness is local: action draws use a ``torch.Generator`` and minibatch shuffles a NumPy generator, both
seeded by ``seed``, so a run is a function of (policy weights, configs, seed) on the CPU and nothing global
(torch's default generator) is consumed or reset. An episode cut by a time limit counts as done (no value
bootstrapping), as in CleanRL.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

import numpy as np
import torch
from torch import nn

from .config import EnvConfig, PPOConfig
from .envs import SeededVectorEnv, training_seeds

Progress = Callable[[str], None]
# forward(policy, obs, step) -> action logits at optimiser step ``step`` (the families' ChildTrainer hook)
Forward = Callable[[nn.Module, torch.Tensor, int], torch.Tensor]


def updates_and_steps(env_cfg: EnvConfig, ppo_cfg: PPOConfig) -> tuple[int, int]:
    """(batches, optimiser steps) :func:`train_ppo` takes: ``ppo_cfg.total_steps`` rounded up to whole batches
    of ``env_cfg.num_envs * ppo_cfg.num_steps`` transitions, each used for ``update_epochs`` passes of its
    minibatches."""
    batch_size = env_cfg.num_envs * ppo_cfg.num_steps
    minibatch_size = max(1, batch_size // ppo_cfg.num_minibatches)
    updates = -(-ppo_cfg.total_steps // batch_size)  # ceil: at least the asked-for steps
    return updates, updates * ppo_cfg.update_epochs * -(-batch_size // minibatch_size)


def train_ppo(policy: nn.Module, env_cfg: EnvConfig, ppo_cfg: PPOConfig, seed: int, progress: Progress = print,
              on_update: Callable[[dict], bool | None] | None = None,
              after_step: Callable[[nn.Module], None] | None = None, log_every: int | None = None, *,
              forward: Forward | None = None, schedule: Callable[[int, int], float] | None = None,
              weight_decay: float = 0.0) -> dict:
    """Train ``policy`` (an :class:`~.policies.ActorCritic`: ``logits_and_value(obs)``) in place for
    ``ppo_cfg.total_steps`` environment steps (rounded up to whole batches) on the policy's device.

    ``on_update(stats)`` is called after every batch's update (stats as returned below, so far); returning
    True stops training there. ``after_step(policy)`` runs after every optimiser step, e.g. to re-apply a
    pruning mask. A progress line (steps/s, mean episodic return) is printed every ``log_every`` updates
    (default: about ten lines per run) and after the last.

    ``forward(policy, obs, step)`` replaces ``policy(obs)`` for the action logits, in the rollouts and in the
    updates (``step``: optimiser steps taken so far, so a rollout acts with the mask of the step after it);
    the values stay ``policy.value(obs)``. ``schedule(step, total)`` replaces ``anneal_lr``: the learning
    rate of optimiser step ``step`` of ``total`` is ``ppo_cfg.lr * schedule(step, total)``. Adam's
    ``weight_decay`` is 0 for PPO proper.

    Returns ``{"steps", "episodes", "updates", "seconds", "mean_return"}``: ``mean_return`` is the mean return
    of the last (up to) 20 training episodes that finished, NaN when none did."""
    device = next(policy.parameters()).device
    envs = SeededVectorEnv(env_cfg, training_seeds(env_cfg))
    num_envs, num_steps = envs.num_envs, ppo_cfg.num_steps
    batch_size = num_envs * num_steps
    minibatch_size = max(1, batch_size // ppo_cfg.num_minibatches)
    num_updates, total_opt_steps = updates_and_steps(env_cfg, ppo_cfg)
    log_every = log_every or max(1, num_updates // 10)
    sampler = torch.Generator(device=device).manual_seed(seed)
    shuffler = np.random.default_rng(seed)
    optimizer = torch.optim.Adam(policy.parameters(), lr=ppo_cfg.lr, eps=1e-5, weight_decay=weight_decay)
    opt_step = 0

    def heads(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Action logits and values of observations ``x`` at the current optimiser step."""
        if forward is None:
            return policy.logits_and_value(x)
        return forward(policy, x, opt_step), policy.value(x)

    # Rollout storage, one row per step
    obs_shape = envs.single_observation_space.shape
    obs = torch.zeros((num_steps, num_envs) + obs_shape, device=device)
    actions = torch.zeros((num_steps, num_envs), dtype=torch.long, device=device)
    logprobs = torch.zeros((num_steps, num_envs), device=device)
    rewards = torch.zeros((num_steps, num_envs), device=device)
    dones = torch.zeros((num_steps, num_envs), device=device)
    values = torch.zeros((num_steps, num_envs), device=device)

    start = time.perf_counter()
    steps, episodes, recent = 0, 0, deque(maxlen=20)
    stats = {"steps": 0, "episodes": 0, "updates": 0, "seconds": 0.0, "mean_return": float("nan")}
    next_obs = torch.as_tensor(envs.reset(), dtype=torch.float32, device=device)
    next_done = torch.zeros(num_envs, device=device)
    try:
        for update in range(1, num_updates + 1):
            if ppo_cfg.anneal_lr and schedule is None:  # linear decay to 0 at the last update
                optimizer.param_groups[0]["lr"] = ppo_cfg.lr * (1.0 - (update - 1.0) / num_updates)

            # Collect a batch with the current policy
            for step in range(num_steps):
                obs[step], dones[step] = next_obs, next_done
                with torch.no_grad():
                    logits, value = heads(next_obs)
                    log_probs = torch.log_softmax(logits, dim=-1)
                    action = torch.multinomial(log_probs.exp(), 1, generator=sampler).squeeze(-1)
                actions[step], values[step] = action, value
                logprobs[step] = log_probs.gather(-1, action[:, None]).squeeze(-1)
                raw_obs, reward, done, finished = envs.step(action.cpu().numpy())
                rewards[step] = torch.as_tensor(reward, dtype=torch.float32, device=device)
                next_obs = torch.as_tensor(raw_obs, dtype=torch.float32, device=device)
                next_done = torch.as_tensor(done, dtype=torch.float32, device=device)
                steps += num_envs
                episodes += len(finished)
                recent.extend(ret for ret, _ in finished)

            # Generalised advantage estimation, bootstrapped from the value of the state after the batch
            with torch.no_grad():
                next_value = policy.value(next_obs)
                advantages = torch.zeros_like(rewards)
                last_gae = torch.zeros(num_envs, device=device)
                for t in reversed(range(num_steps)):
                    if t == num_steps - 1:
                        not_done, following = 1.0 - next_done, next_value
                    else:
                        not_done, following = 1.0 - dones[t + 1], values[t + 1]
                    delta = rewards[t] + ppo_cfg.gamma * following * not_done - values[t]
                    last_gae = delta + ppo_cfg.gamma * ppo_cfg.gae_lambda * not_done * last_gae
                    advantages[t] = last_gae
                returns = advantages + values

            # Flatten the batch and optimise the clipped surrogate, value and entropy terms
            b_obs = obs.reshape((-1,) + obs_shape)
            b_actions, b_logprobs = actions.reshape(-1), logprobs.reshape(-1)
            b_advantages, b_returns, b_values = advantages.reshape(-1), returns.reshape(-1), values.reshape(-1)
            clipped = []
            for _ in range(ppo_cfg.update_epochs):
                order = torch.as_tensor(shuffler.permutation(batch_size), device=device)
                for first in range(0, batch_size, minibatch_size):
                    mb = order[first:first + minibatch_size]
                    if schedule is not None:
                        optimizer.param_groups[0]["lr"] = ppo_cfg.lr * schedule(opt_step, total_opt_steps)
                    logits, new_value = heads(b_obs[mb])
                    log_probs = torch.log_softmax(logits, dim=-1)
                    new_logprob = log_probs.gather(-1, b_actions[mb, None]).squeeze(-1)
                    entropy = -(log_probs.exp() * log_probs).sum(-1)
                    ratio = (new_logprob - b_logprobs[mb]).exp()
                    with torch.no_grad():
                        clipped.append(((ratio - 1.0).abs() > ppo_cfg.clip).float().mean().item())

                    mb_adv = b_advantages[mb]
                    if ppo_cfg.norm_adv and len(mb) > 1:
                        mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                    pg_loss = torch.max(-mb_adv * ratio,
                                        -mb_adv * ratio.clamp(1 - ppo_cfg.clip, 1 + ppo_cfg.clip)).mean()
                    # The value loss is clipped around the rollout's values too (CleanRL's clip_vloss)
                    v_clipped = b_values[mb] + (new_value - b_values[mb]).clamp(-ppo_cfg.clip, ppo_cfg.clip)
                    v_loss = 0.5 * torch.max((new_value - b_returns[mb]) ** 2,
                                             (v_clipped - b_returns[mb]) ** 2).mean()
                    loss = pg_loss - ppo_cfg.ent_coef * entropy.mean() + ppo_cfg.vf_coef * v_loss

                    optimizer.zero_grad()
                    loss.backward()
                    nn.utils.clip_grad_norm_(policy.parameters(), ppo_cfg.max_grad_norm)
                    optimizer.step()
                    opt_step += 1
                    if after_step is not None:
                        after_step(policy)

            seconds = time.perf_counter() - start
            stats = {"steps": steps, "episodes": episodes, "updates": update, "seconds": seconds,
                     "mean_return": float(np.mean(recent)) if recent else float("nan")}
            if update % log_every == 0 or update == num_updates:
                progress(f"[ppo] step {steps:,}/{num_updates * batch_size:,}  {steps / seconds:,.0f} steps/s  "
                         f"return {stats['mean_return']:.1f} (last {len(recent)} of {episodes} episodes)  "
                         f"value loss {v_loss.item():.3f}  clipped {np.mean(clipped):.3f}")
            if on_update is not None and on_update(dict(stats)):
                break
    finally:
        envs.close()
    return stats
