"""Throughput of policy evaluation: environment steps per second of candidate scoring, against its limit and
stock EvoTorch.

For each environment a PPO parent is trained first (``parent_steps``, so episodes last as long as a
working policy's do), then, for each actor count in ``actors`` (Ray actors of one torch thread each), every
method scores ``population`` candidates per generation on ``episodes`` validation episodes each:

``limit``
    Actors holding the engine's evaluator play the parent's own validation episodes, once per candidate,
    with the same batching of ``num_envs`` episodes through the policy: the most any method can reach
    without skipping work (no child is materialised, the parent never changes).
``engine``
    A :class:`~evo_subens.core.problem.SubnetworkProblem` scoring noisy children (``density``, relative
    ``sigma``) of the parent: genomes in, mean returns and step counts out; every candidate plays the same
    seeded episodes.
``stock GymNE``
    EvoTorch's ``GymNE`` with the same policy network and environment: solutions are float vectors of all
    the policy's parameters (the parent's, with Gaussian noise on ``density`` of the entries), each episode
    played one observation at a time (GymNE's design), its episodes unseeded.
``stock VecGymNE``
    EvoTorch's ``VecGymNE``: the same vectors, one vectorised environment per actor stepping every
    solution's episodes together, the network applied batched to all of them.

Rates are environment steps per second (episode lengths differ between methods as their policies do; the
mean episode length is printed beside them), the median of ``repeats`` generations after a warm-up
generation that absorbs actor start-up. Every method has actors of its own, all alive together, and the
methods take turns, one generation each per round, so the drift of a shared machine hits them alike.

    evo-subens bench rl-throughput --envs CartPole-v1,minatar:breakout --actors 1,2
"""

from __future__ import annotations

import gc
import logging
import os
import statistics
import time
from typing import Callable

import numpy as np
import ray
import torch
from evotorch import Problem
from evotorch.neuroevolution import GymNE, VecGymNE
from torch import nn

from ..core.config import ChildrenConfig, WorkersConfig
from ..core.problem import ACTOR_ENV, actor_options, make_problem
from ..core.worker import parent_fingerprint, torch_threads
from ..families import make_family
from ..nn import state_copy
from ..tasks.rl.config import EnvConfig, PolicyConfig, PPOConfig
from ..tasks.rl.envs import env_spaces, make_env
from ..tasks.rl.evaluation import PolicyEvaluator, RLPayload
from ..tasks.rl.policies import build_policy
from ..tasks.rl.ppo import train_ppo
from .throughput import split_evenly

METHODS = ("limit", "engine", "stock GymNE", "stock VecGymNE")
SIGMA = 0.05  # relative noise of the engine's children; the stock vectors get SIGMA x the parameters' std


# ---------------------------------------------------------------------------------------------- the limit

@ray.remote
class ParentRolloutActor:
    """Holds the parent like an evaluation actor and plays its validation episodes."""

    def __init__(self, payload: RLPayload):
        torch.set_num_threads(payload.threads)
        self.evaluator = PolicyEvaluator(payload)

    def play(self, count: int) -> tuple[int, int]:
        """(env steps, episodes) of ``count`` passes over the validation episodes."""
        steps = sum(self.evaluator.returns().steps for _ in range(count))
        return steps, count * len(self.evaluator.payload.seeds)


class LimitMethod:
    def __init__(self, payload: RLPayload, workers: WorkersConfig):
        options = dict(actor_options(workers), max_restarts=0, max_task_retries=0)
        self.actors = [ParentRolloutActor.options(**options).remote(payload) for _ in range(workers.num_actors)]

    def generation(self, population: int) -> tuple[int, int]:
        played = ray.get([a.play.remote(n) for a, n in zip(self.actors, split_evenly(population, len(self.actors)))])
        return sum(s for s, _ in played), sum(e for _, e in played)

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


class EngineMethod:
    def __init__(self, payload: RLPayload, workers: WorkersConfig, population: int):
        self.family = make_family(payload.children)
        self.root = self.family.root(payload.parent_id)
        self.rng = np.random.default_rng(0)
        self.episodes = len(payload.seeds)
        self.problem = make_problem(workers, payload, fitness="return", population=population)
        self.problem.all_remote_problems()  # creates the actors

    def generation(self, population: int) -> tuple[int, int]:
        batch = self.problem.make_batch([g for _, g in self.family.propose([self.root], population, self.rng)])
        self.problem.evaluate(batch)
        steps = sum(self.problem.unpack(row)[1]["env_steps"] for row in batch.evals)
        return int(steps), population * self.episodes

    def close(self) -> None:
        self.problem.close()


class _Unbatched(nn.Module):
    """GymNE hands its network one observation at a time (VecGymNE too, under vmap); the policies take
    batches."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.policy(obs.unsqueeze(0)).squeeze(0)


class _StockMethod:
    """Shared by both stock problems: noisy copies of the parent's parameter vector, evaluated by EvoTorch."""

    problem: Problem

    def __init__(self, parent: nn.Module, density: float, episodes: int):
        self.parent = nn.utils.parameters_to_vector(parent.parameters()).detach()
        self.density, self.episodes = density, episodes
        self.generator = torch.Generator().manual_seed(0)

    def generation(self, population: int) -> tuple[int, int]:
        values = self.parent.expand(population, -1).clone()
        mask = torch.rand(values.shape, generator=self.generator) < self.density
        noise = torch.randn(values.shape, generator=self.generator) * SIGMA * float(self.parent.std())
        batch = self.problem.generate_batch(population)
        batch.set_values(values + noise * mask)
        before = self._steps()
        self.problem.evaluate(batch)
        return self._steps() - before, population * self.episodes

    def _steps(self) -> int:
        if self.problem.actors:  # the actors' counters reach the main problem with each evaluation
            return int(self.problem.status.get("total_interaction_count", 0))
        return int(self.problem.interaction_count)

    def close(self) -> None:
        if self.problem.actors:
            self.problem.kill_actors()


class GymNEMethod(_StockMethod):
    def __init__(self, parent: nn.Module, env_cfg: EnvConfig, workers: WorkersConfig, episodes: int,
                 density: float):
        network = _Unbatched(parent)
        super().__init__(network, density, episodes)
        self.problem = GymNE(env=lambda: make_env(env_cfg), network=network, num_episodes=episodes,
                             num_actors=workers.num_actors, actor_config=actor_options(workers))
        self.problem.all_remote_problems()


class VecGymNEMethod(_StockMethod):
    def __init__(self, parent: nn.Module, env_cfg: EnvConfig, workers: WorkersConfig, episodes: int,
                 density: float):
        network = _Unbatched(parent)  # VecGymNE vmaps the network over its environments, one observation each
        super().__init__(network, density, episodes)
        make_one = lambda: make_env(env_cfg)  # noqa: E731 (pickled into the actors)
        self.problem = VecGymNE(env=lambda num_envs, **_: gym_vector(make_one, num_envs), network=network,
                                num_episodes=episodes, num_actors=workers.num_actors,
                                actor_config=actor_options(workers), device="cpu")
        self.problem.all_remote_problems()


def gym_vector(make_one: Callable, num_envs: int):
    """A synchronous gymnasium vector environment of ``num_envs`` copies, as VecGymNE's env factory."""
    import gymnasium as gym

    return gym.vector.SyncVectorEnv([make_one for _ in range(num_envs)])


# ----------------------------------------------------------------------------------------------- measuring

def _parent(env_cfg: EnvConfig, policy_cfg: PolicyConfig, steps: int) -> tuple[nn.Module, tuple, int]:
    obs_shape, actions = env_spaces(env_cfg)
    torch.manual_seed(0)
    policy = build_policy(policy_cfg, obs_shape, actions)
    if steps:
        with torch_threads(1):  # beside EnvPool's stepping thread (see RLTask._threads)
            train_ppo(policy, env_cfg, PPOConfig(total_steps=steps), seed=0, progress=lambda line: None)
    return policy.eval(), obs_shape, actions


def _measure(factories: dict[str, Callable[[], object]], population: int, repeats: int) -> dict[str, dict]:
    """Rates of every method, taking turns; their actors are killed whatever happens."""
    live: dict[str, object] = {}
    try:
        for name, factory in factories.items():
            live[name] = factory()
            live[name].generation(population)  # warm-up: actor start-up, payload transfer, first environments
        rates: dict[str, list[float]] = {name: [] for name in live}
        lengths: dict[str, list[float]] = {name: [] for name in live}
        for _ in range(repeats):
            for name, method in live.items():
                started = time.perf_counter()
                steps, episodes = method.generation(population)
                rates[name].append(steps / (time.perf_counter() - started))
                lengths[name].append(steps / episodes)
    finally:
        for method in live.values():
            method.close()
        live.clear()
        gc.collect()  # EvoTorch's objects form reference cycles
    return {name: {"steps_per_s": statistics.median(rates[name]), "episode_length": statistics.fmean(lengths[name])}
            for name in rates}


def rl_throughput(*, envs: list[str], actors: list[int] = (1, 2), population: int = 16, episodes: int = 8,
                  num_envs: int = 8, density: float = 0.1, parent_steps: int = 20_000, repeats: int = 3,
                  methods: list[str] = METHODS) -> list[dict]:
    """Run the benchmark and print its table; returns its rows."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    logging.getLogger("evotorch").setLevel(logging.WARNING)
    if not ray.is_initialized():
        # Every method's actors are alive together (one CPU each as Ray counts; they take turns working).
        ray.init(num_cpus=max(os.cpu_count() or 1, len(methods) * max(actors)), include_dashboard=False,
                 runtime_env={"env_vars": ACTOR_ENV})
    print(f"rl throughput: population {population}, {episodes} validation episodes per candidate, {num_envs} "
          f"episodes batched per actor (engine, limit), noisy children density {density}, actors x 1 thread, "
          f"median of {repeats} generations, env steps/s")
    print(f"{'env':<20}{'actors':>7}  {'method':<16}{'steps/s':>10}{'ratio':>8}{'ep. length':>12}")
    rows = []
    for env_id in envs:
        env_cfg = EnvConfig(id=env_id, num_envs=num_envs, validation_episodes=episodes)
        policy_cfg = PolicyConfig(name="mlp" if env_id.count(":") == 0 else
                                  "minatar_cnn" if env_id.startswith("minatar:") else "nature_cnn")
        parent, obs_shape, num_actions = _parent(env_cfg, policy_cfg, parent_steps)
        state = state_copy(parent)
        children = ChildrenConfig(family="noisy", density=density, sigma=SIGMA, sigma_mode="relative")
        for count in actors:
            workers = WorkersConfig(num_actors=count, threads_per_actor=1)
            payload = RLPayload(policy=policy_cfg, obs_shape=obs_shape, num_actions=num_actions,
                                parent_state=state, parent_id=parent_fingerprint(state), children=children,
                                env=env_cfg, seeds=tuple(env_cfg.validation_seeds), threads=1)
            factories = {
                "limit": lambda: LimitMethod(payload, workers),
                "engine": lambda: EngineMethod(payload, workers, population),
                "stock GymNE": lambda: GymNEMethod(parent, env_cfg, workers, episodes, density),
                "stock VecGymNE": lambda: VecGymNEMethod(parent, env_cfg, workers, episodes, density),
            }
            measured = _measure({m: factories[m] for m in methods}, population, repeats)
            limit = measured.get("limit", {}).get("steps_per_s")
            for method in methods:
                row = {"env": env_id, "actors": count, "method": method, **measured[method]}
                row["ratio"] = row["steps_per_s"] / limit if limit else float("nan")
                rows.append(row)
                print(f"{env_id:<20}{count:>7}  {method:<16}{row['steps_per_s']:>10,.0f}{row['ratio']:>8.2f}"
                      f"{row['episode_length']:>12.1f}", flush=True)
    return rows
