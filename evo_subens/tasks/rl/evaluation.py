"""Scoring policies on validation episodes: the code every worker runs, Ray actor or in-process.

A worker receives an :class:`RLPayload` once (the parent policy, the environment, the validation seeds)
and then only genomes; it materialises each child on its copy of the parent and plays one greedy episode
per validation seed. Every candidate plays the same episodes (common random numbers), so a candidate's
fitness, its mean return, is a function of its genome.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ...core.config import ChildrenConfig
from ...core.worker import CandidateScore, Evaluator, WorkerPayload
from ...families import make_family
from ...nn import state_copy
from .config import EnvConfig, PolicyConfig
from .envs import episode_returns
from .metrics import VALIDATION_METRICS
from .policies import build_policy


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
        self.materialiser = self.family.bind(self.model)

    def returns(self, seeds: tuple[int, ...] | None = None):
        """The episode returns of the policy as it is now (the parent, outside ``materialised``)."""
        return episode_returns(self.model, self.payload.env, seeds or self.payload.seeds, device=self.device)

    def evaluate_many(self, genomes: list[str]) -> list[CandidateScore]:
        scores = []
        for genome in genomes:
            started = time.perf_counter()
            with self.materialiser.materialised(genome):
                played = self.returns()
            scores.append(CandidateScore((float(played.returns.mean()),), time.perf_counter() - started))
        return scores

    def child_state(self, genome: str) -> dict[str, torch.Tensor]:
        with self.materialiser.materialised(genome):
            return state_copy(self.model)

    def finetuned_state(self, genome: str, seed: int, start: dict[str, torch.Tensor] | None = None):
        raise NotImplementedError("fine-tuning policies (PPO on selected members) is not supported yet")
