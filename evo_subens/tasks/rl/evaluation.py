"""Scoring policies on validation episodes: the code every worker runs, Ray actor or in-process.

A worker receives an :class:`RLPayload` once (the parent policy, the environment, the validation seeds)
and then only genomes; it materialises each child on its copy of the parent and plays one greedy episode
per validation seed. Every candidate plays the same episodes (common random numbers), so a candidate's
fitness, its mean return, is a function of its genome. Families that train children (sparse, stochastic)
tune each child with PPO on the training episodes before it plays (:class:`~.training.PPOTrainer`), and
selected members are fine-tuned the same way (:meth:`PolicyEvaluator.finetuned_state`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ...core.config import ChildrenConfig, FinetuneConfig
from ...core.worker import CandidateScore, Evaluator, WorkerPayload
from ...families import make_family
from ...nn import state_copy
from .config import EnvConfig, PolicyConfig, PPOConfig
from .envs import episode_returns
from .metrics import VALIDATION_METRICS
from .policies import build_policy
from .training import PPOTrainer


@dataclass
class RLPayload(WorkerPayload):
    """Everything a worker needs, shipped once per worker (through Ray's object store)."""

    policy: PolicyConfig
    obs_shape: tuple[int, ...]
    num_actions: int
    parent_state: dict[str, torch.Tensor]
    parent_id: str
    children: ChildrenConfig
    env: EnvConfig
    seeds: tuple[int, ...]  # the episodes that score a candidate (validation seeds used for selection)
    threads: int
    use_gpu: bool = False
    stack_candidates: int = 1
    ppo: PPOConfig | None = None  # PPO settings of tuning children and fine-tuning members (see .training)
    finetune: FinetuneConfig | None = None  # PPO batches on selected members (see finetuned_state)

    metrics = VALIDATION_METRICS

    def make_evaluator(self, device: str | torch.device = "cpu") -> "PolicyEvaluator":
        return PolicyEvaluator(self, device)


class PolicyEvaluator(Evaluator):
    """Holds the parent policy on one device and scores genomes by their validation episodes' mean return."""

    def __init__(self, payload: RLPayload, device: str | torch.device = "cpu"):
        self.payload = payload
        self.device = torch.device(device)
        self.model = build_policy(payload.policy, payload.obs_shape, payload.num_actions)
        self.model.load_state_dict(payload.parent_state)
        self.model.to(self.device).eval()
        self.family = make_family(payload.children)
        trainer = None
        if self.family.trains_children:
            if payload.ppo is None:
                raise ValueError("this payload carries no PPO settings to tune its family's children with")
            trainer = PPOTrainer(payload.env, payload.ppo)
        self.materialiser = self.family.bind(self.model, trainer)
        # Tuned children are expensive to rebuild: keep the weights of those scored here until fetched.
        self._trained: dict[str, dict[str, torch.Tensor]] = {}

    def returns(self, seeds: tuple[int, ...] | None = None):
        """The episode returns of the policy as it is now (the parent, outside ``materialised``)."""
        return episode_returns(self.model, self.payload.env, seeds or self.payload.seeds, device=self.device)

    def evaluate_many(self, genomes: list[str]) -> list[CandidateScore]:
        scores = []
        for genome in genomes:
            started = time.perf_counter()
            with self.materialiser.materialised(genome):
                played = self.returns()
                if self.family.trains_children:
                    self._trained[genome] = state_copy(self.model)
            scores.append(CandidateScore((float(played.returns.mean()), float(played.steps)),
                                         time.perf_counter() - started))
        return scores

    def child_state(self, genome: str) -> dict[str, torch.Tensor]:
        """A CPU copy of the child's ``state_dict`` (kept from its evaluation when it was tuned, else built)."""
        if genome in self._trained:
            return self._trained[genome]
        with self.materialiser.materialised(genome):
            return state_copy(self.model)

    def finetuned_state(self, genome: str, seed: int,
                        start: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The child ``genome`` (weights ``start`` when given, else its own) after ``finetune.epochs`` PPO
        batches on the training episodes (the tune mapping of :mod:`.training`), its family's constraint (a
        fixed mask) re-applied after every optimiser step; a CPU ``state_dict``, a function of (genome, seed,
        start) in any worker."""
        if self.payload.finetune is None or self.payload.ppo is None:
            raise ValueError("this payload carries no fine-tuning settings")
        model = build_policy(self.payload.policy, self.payload.obs_shape, self.payload.num_actions)
        model.load_state_dict(start if start is not None else self.child_state(genome))
        model.to(self.device)
        constraint = self.family.constraint(genome, self.materialiser)
        PPOTrainer(self.payload.env, self.payload.ppo).train(model, self.payload.finetune, seed=seed,
                                                             parameter_filter=constraint)
        self._trained.pop(genome, None)  # fetched for the last time: its fine-tuned successor replaces it
        return state_copy(model)
