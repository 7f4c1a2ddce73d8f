"""Reinforcement learning as a task: a policy parent trained with PPO, candidates scored by the mean return
of fixed, seeded validation episodes, members acting together as an ensemble policy.

    >>> task = RLTask(load_config("configs/rl-cartpole.yaml"), print)
    >>> task.load(); policy = task.new_model(); task.train_parent(policy)

Seeds keep the three kinds of episode apart: training episodes (PPO) start from ``env.train_seed``, the
validation episodes that score candidates from ``env.validation_seed`` (the tail ``ensemble.holdout`` of
them is held back to check decisions), the final test episodes from ``env.test_seed``; the config check
refuses overlapping sets. Families that train children tune them with PPO on training episodes, and
``finetune.epochs`` fine-tunes members the same way; :mod:`.training` says what the tune and fine-tune
sections' fields mean for PPO.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Sequence

from torch import nn

from ...core.search import CandidateRecord, Ranking, select_members
from ...core.worker import torch_threads
from ...errors import ConfigError, UserError
from ...families import make_family
from ...nn import count_parameters, load_parent_state
from ..base import Task
from .envs import env_spaces, episode_returns
from .evaluation import RLPayload
from .metrics import VALIDATION_METRICS
from .policies import build_policy
from .ppo import train_ppo
from .training import tuning_env_steps
from .ensemble import EnsemblePolicy
from .results import policy_results, summary_lines, verdict


class RLTask(Task):
    """A discrete-action environment: a PPO parent policy, children scored by validation-episode return."""

    name = "rl"
    metrics = VALIDATION_METRICS

    def load(self, data: object | None = None) -> None:
        cfg = self.cfg
        if data is not None:
            raise UserError("the rl task takes no data: its episodes come from the environment (env.id)")
        if cfg.search.racing:
            raise ConfigError("search.racing", "false for the rl task (racing bounds classification metrics)", True)
        self._check_training()
        if cfg.ensemble.selection != "topk":
            raise ConfigError("ensemble.selection", "topk for the rl task", cfg.ensemble.selection)
        self.progress(f"[env] {cfg.env.id}")
        self.obs_shape, self.num_actions = env_spaces(cfg.env)
        seeds = cfg.env.validation_seeds
        held = int(round(cfg.ensemble.holdout * len(seeds)))
        if held >= len(seeds):
            raise ConfigError("ensemble.holdout", f"a share that leaves validation episodes to select on "
                                                  f"({len(seeds)} in all)", cfg.ensemble.holdout)
        self.selection_seeds = tuple(seeds[:len(seeds) - held])
        self.holdout_seeds = tuple(seeds[len(seeds) - held:])

    def _check_training(self) -> None:
        """Refuse tune and fine-tune settings PPO cannot honour (see :mod:`.training`)."""
        cfg = self.cfg
        tune = cfg.children.tuning() if make_family(cfg.children).trains_children else None
        sections = [("children.tune", tune), ("finetune", cfg.finetune)]
        for path, section in sections:
            if section is None or not section.epochs:
                continue
            if section.optimizer != "adam":
                raise ConfigError(f"{path}.optimizer", "adam for the rl task (PPO's optimiser; set lr on PPO's "
                                                       "scale too, e.g. 2.5e-4)", section.optimizer)
        if tune is not None and tune.epochs and tune.bagging:
            raise ConfigError("children.tune.bagging", "false for the rl task (training episodes are a stream, "
                                                       "there is no split to subsample)", True)

    def describe_data(self) -> str:
        env = self.cfg.env
        held = f" + {len(self.holdout_seeds)} held back" if self.holdout_seeds else ""
        return (f"[env] {env.id}: observations {self.obs_shape}, {self.num_actions} actions; validation "
                f"{len(self.selection_seeds)} episodes{held}, test {env.test_episodes} (seeds from {env.test_seed})")

    def scored_on(self) -> str:
        total = len(self.selection_seeds) + len(self.holdout_seeds)
        if not self.holdout_seeds:
            return f"validation episodes ({total} seeds)"
        return f"validation episodes ({len(self.selection_seeds)} of {total} seeds; the rest held back)"

    def new_model(self) -> nn.Module:
        return build_policy(self.cfg.policy, self.obs_shape, self.num_actions)

    def load_parent(self, path: str | Path, model: nn.Module) -> None:
        load_parent_state(path, model)

    def train_parent(self, model: nn.Module) -> None:
        cfg = self.cfg
        self.progress(f"[parent] training a {count_parameters(model):,}-parameter {cfg.policy.name} policy with "
                      f"PPO for {cfg.ppo.total_steps:,} steps on {cfg.env.id}")
        with self._threads():
            train_ppo(model, cfg.env, cfg.ppo, seed=cfg.seed, progress=lambda line: self.progress(f"[parent] {line}"))

    def _threads(self) -> contextlib.AbstractContextManager:
        """One torch thread beside ProcGen: EnvPool steps the game in a thread of its own, which torch's spare
        threads (spinning after each forward pass) starve on a small machine (PPO measured 600 -> 55 steps/s
        with torch's default threads on 2 cores)."""
        return torch_threads(1) if self.cfg.env.id.startswith("procgen:") else contextlib.nullcontext()

    def worker_payload(self, parent_state: dict, parent_id: str) -> RLPayload:
        cfg = self.cfg
        self.parent_state = parent_state  # the gated ensemble policy consults the parent
        return RLPayload(policy=cfg.policy, obs_shape=self.obs_shape, num_actions=self.num_actions,
                         parent_state=parent_state, parent_id=parent_id, children=cfg.children, env=cfg.env,
                         seeds=self.selection_seeds, threads=cfg.workers.threads_per_actor,
                         use_gpu=cfg.workers.num_gpus_per_actor > 0, ppo=cfg.ppo,
                         finetune=cfg.finetune if cfg.finetune.epochs else None)

    def _policy(self, state: dict) -> nn.Module:
        model = self.new_model()
        model.load_state_dict(state)
        return model.eval()

    def _mean_return(self, policy: nn.Module, seeds: Sequence[int]) -> float:
        with self._threads():
            return float(episode_returns(policy, self.cfg.env, seeds).returns.mean())

    def holdout_check(self, weights) -> dict:
        if not self.holdout_seeds or weights is None:
            return {"holdout_return": None}
        return {"holdout_return": self._mean_return(self._policy(weights()), self.holdout_seeds)}

    def select(self, records: list[CandidateRecord], count: int, prior: list[CandidateRecord],
               states_of) -> tuple[list[CandidateRecord], dict | None]:
        ranking = Ranking(self.metrics, self.cfg.search.fitness)
        return select_members(records, len(prior) + count, ranking, prior)[len(prior):], None

    def accept(self, kept: Sequence[dict], new: Sequence[dict]) -> list[int]:
        """With ``ensemble.acceptance``: a member joins only if the ensemble policy's mean return on the
        selection episodes is not lower with it (returns tie often: a capped episode scores the maximum)."""
        if not self.cfg.ensemble.acceptance:
            return list(range(len(new)))
        members = [self._policy(s) for s in kept]
        parent = self._parent_policy

        def score(group: list[nn.Module]) -> float:
            return self._mean_return(EnsemblePolicy(group, self.cfg.ensemble.rule, parent,
                                                    self.cfg.ensemble.gate_threshold), self.selection_seeds)

        current = score(members) if members else -math.inf
        accepted = []
        for j, state in enumerate(new):
            trial_members = members + [self._policy(state)]
            trial = score(trial_members)
            if not members or trial >= current:
                accepted.append(j)
                members, current = trial_members, trial
        return accepted

    @property
    def _parent_policy(self) -> nn.Module:
        return self._policy(self.parent_state)

    def results(self, parent: nn.Module, member_states: list[dict], member_ids: list[int]) -> dict:
        members = [self._policy(s) for s in member_states]
        self.progress(f"[test] parent, {len(members)} members and ensemble policies on {self.cfg.env.test_episodes} "
                      f"test and as many training episodes")
        with self._threads():
            return policy_results(parent.eval(), members, member_ids, self.cfg)

    def cost(self, *, records, selected: int, members: int) -> dict:
        """Environment steps of PPO (parent, tuned children, fine-tuned members: whole batches, as configured)
        and of the candidates' validation episodes (as played: their lengths depend on the policies)."""
        cfg = self.cfg
        candidates = len(records)
        played = sum(int(r.metrics["env_steps"]) for r in records if not math.isnan(r.metrics["env_steps"]))
        env = cfg.env
        batch = env.num_envs * cfg.ppo.num_steps  # PPO trains in whole batches
        parent_steps = 0 if cfg.model.parent_path else -(-cfg.ppo.total_steps // batch) * batch
        tune = cfg.children.tuning() if make_family(cfg.children).trains_children else None
        tune_steps = tuning_env_steps(env, cfg.ppo, tune) if tune is not None else 0
        return {"parent_env_steps": parent_steps, "tuning_env_steps": candidates * tune_steps,
                "finetune_env_steps": selected * tuning_env_steps(env, cfg.ppo, cfg.finetune),
                "evaluation_episodes": candidates * env.validation_episodes, "evaluation_env_steps": played,
                "candidates": candidates,
                "selected": selected, "members": members}

    def verdict(self, metrics: dict) -> dict:
        return verdict(metrics)

    def summary(self, metrics: dict, offered: int) -> list[str]:
        return summary_lines(metrics, offered)

    def warnings(self, metrics: dict) -> list[str]:
        gap = metrics["verdict"]["test_return_gain"]
        if gap < 0:
            return [f"WARNING: the ensemble policy's mean test return is {-gap:.2f} below its parent's"]
        return []

    def diagnostics(self, rows: list[dict]) -> list[str]:
        return []

    def check_baseline(self) -> None:
        raise ConfigError("method", "subnetworks for the rl task (the baselines train classifiers)", self.cfg.method)

    def run_baseline(self, run_dir: Path):
        self.check_baseline()

