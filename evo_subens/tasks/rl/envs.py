"""Environments: making them from an :class:`~.config.EnvConfig`, training copies that start every episode
from a known seed, and :func:`episode_returns`, which plays exactly one episode per seed.

Every observation leaves this module channels-first (a MinAtar grid (10, 10, C) becomes (C, 10, 10)), so
the policies see one layout; tensors handed to a policy are float32 (ProcGen's frames stay uint8 pixels,
0-255, until then: the pixel networks divide by 255).

ProcGen (``procgen:<game>``, through EnvPool) is the one family where a seed names a level rather than an
episode's random stream: an episode with seed ``s`` plays level ``s``, and ``env.train_levels: 200`` with
``train_seed: 0`` is the ProcGen protocol's ``num_levels=200, start_level=0``. See :class:`ProcgenLevels`.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator, NamedTuple, Sequence

import gymnasium as gym
import numpy as np
import torch

from .config import MINATAR_GAMES, PROCGEN_GAMES, EnvConfig

Policy = Callable[[torch.Tensor], torch.Tensor]  # observations (B, ...) -> action logits (B, A)

# The stream of a sampled (non-greedy) evaluation episode's actions is keyed by its seed and this tag, so it
# is not the environment's own stream for that seed.
_ACTION_STREAM = 0x5EED


class _ChannelsFirst(gym.ObservationWrapper):
    """(H, W, C) grids to (C, H, W) float32, the layout torch's convolutions take."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        h, w, c = env.observation_space.shape
        self.observation_space = gym.spaces.Box(0.0, 1.0, (c, h, w), np.float32)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.moveaxis(observation, -1, 0), dtype=np.float32)


class _FreshStickyAction(gym.Wrapper):
    """MinAtar repeats the previous action with probability 0.1 but keeps that action across resets, so an
    episode would depend on how the one before it ended; starting each episode from action 0 (its state
    after construction) makes an episode a function of its seed and the policy only."""

    def reset(self, **kwargs):
        self.env.unwrapped.game.last_action = 0
        return self.env.reset(**kwargs)


def _minatar(game: str, max_episode_steps: int | None) -> gym.Env:
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # MinAtar warns at import that it cannot render without seaborn
    try:
        import minatar.gym as minatar_gym
    finally:
        logging.disable(previous)
    name = "MinAtar/" + game.title().replace("_", "") + "-v1"  # v1: the game's minimal action set
    if name not in gym.registry:
        minatar_gym.register_envs()
    return _ChannelsFirst(_FreshStickyAction(gym.make(name, max_episode_steps=max_episode_steps)))


def _envpool():
    try:
        import envpool
    except ImportError as error:
        raise ImportError("procgen:<game> environments need EnvPool: pip install -e '.[rl]' (envpool on "
                          "PyPI)") from error
    return envpool


class ProcgenLevels(gym.Env):
    """One ProcGen game (easy mode, through EnvPool) where ``reset(seed=s)`` starts level ``s``.

    EnvPool fixes a ProcGen environment's levels when it is made and ignores ``reset(seed=...)``: each of
    its copies draws every episode's level from ``[start_level, start_level + num_levels)`` with a generator
    seeded at construction, so episodes of one EnvPool environment with ``num_levels=200`` play levels in
    an order that depends on how many episodes came before. Here level ``s`` is made as an EnvPool
    environment of one copy with ``start_level=s, num_levels=1``: its every episode is level ``s`` and
    ProcGen re-seeds the game's own generator with the level at every reset, so an episode is a function
    of its seed and the actions taken (the same frames and rewards from a fresh environment or a reused
    one; tests/test_rl_procgen.py). A reset to the level already loaded reuses it; another level costs
    about 2 ms (making, resetting and closing one; the first in a process ~3 s: EnvPool loads ProcGen's
    assets), against ~0.3 ms per step, so a new environment per episode costs little.

    Observations are EnvPool's channels-first uint8 frames (3, 64, 64); 15 actions. ``max_episode_steps``
    truncates an episode here: EnvPool's own option of that name does not end ProcGen episodes, which stop
    only at the game's time limit (1000 steps for most games, bigfish 6000), reported as termination.

    EnvPool steps the game in a worker thread of its own. When torch's OpenMP threads spin-wait after a
    forward pass and the machine has no idle core, that thread waits for one: on 2 busy cores a small
    IMPALA policy played ~24 steps/s with torch's default 2 threads, ~300 with one thread (as the workers
    that score candidates run, ``workers.threads_per_actor: 1``) or with ``OMP_WAIT_POLICY=PASSIVE`` in the
    environment of the process (read when torch loads)."""

    metadata = {"render_modes": []}

    def __init__(self, game: str, max_episode_steps: int | None = None):
        if game not in PROCGEN_GAMES:
            raise ValueError(f"unknown ProcGen game {game!r}; one of {', '.join(PROCGEN_GAMES)}")
        _envpool()  # a missing EnvPool is said when the environment is made, not at its first episode
        self.game = game
        self.task_id = game.capitalize() + "Easy-v0"
        self.max_episode_steps = max_episode_steps
        self.observation_space = gym.spaces.Box(0, 255, (3, 64, 64), np.uint8)
        self.action_space = gym.spaces.Discrete(15)
        self.level: int | None = None
        self.elapsed = 0
        self._pool = None

    def _make(self, level: int):
        try:
            return _envpool().make(self.task_id, env_type="gymnasium", num_envs=1, num_threads=1, seed=level,
                                   num_levels=1, start_level=level)
        except ImportError as error:  # EnvPool's ProcGen links against Qt 5, which its wheel does not bring
            raise ImportError(f"procgen:{self.game}: {error} (Debian/Ubuntu: apt-get install libqt5gui5, "
                              "which `make system-packages` does as root)") from error

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        """Start level ``seed`` (None: the level of the last episode again, level 0 at first)."""
        level = int(seed) if seed is not None else (self.level if self.level is not None else 0)
        if self._pool is None or level != self.level:
            self.close()
            self._pool = self._make(level)
            self.level = level
        obs, _ = self._pool.reset()
        self.elapsed = 0
        return obs[0], {"level": level}

    def step(self, action) -> tuple[np.ndarray, float, bool, bool, dict]:
        obs, reward, terminated, truncated, _ = self._pool.step(np.array([action], dtype=np.int32))
        self.elapsed += 1
        capped = self.max_episode_steps is not None and self.elapsed >= self.max_episode_steps
        return (obs[0], float(reward[0]), bool(terminated[0]), bool(truncated[0]) or capped and not terminated[0],
                {"level": self.level})

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def make_env(env_cfg: EnvConfig) -> gym.Env:
    """One environment for ``env_cfg.id``: a gymnasium id, ``minatar:<game>`` or ``procgen:<game>``."""
    kind, sep, game = env_cfg.id.partition(":")
    if sep and kind == "procgen":
        return ProcgenLevels(game, env_cfg.max_episode_steps)
    if sep and kind == "minatar":
        if game not in MINATAR_GAMES:
            raise ValueError(f"unknown MinAtar game {game!r}; one of {', '.join(MINATAR_GAMES)}")
        return _minatar(game, env_cfg.max_episode_steps)
    return gym.make(env_cfg.id, max_episode_steps=env_cfg.max_episode_steps)


def env_spaces(env_cfg: EnvConfig) -> tuple[tuple[int, ...], int]:
    """(observation shape, number of actions) of the environment; only discrete actions are supported."""
    env = make_env(env_cfg)
    try:
        if not isinstance(env.action_space, gym.spaces.Discrete):
            raise ValueError(f"{env_cfg.id}: only discrete action spaces are supported, got {env.action_space}")
        return tuple(env.observation_space.shape), int(env.action_space.n)
    finally:
        env.close()


def training_seeds(env_cfg: EnvConfig) -> Iterator[int]:
    """The seeds of training episodes, in the order episodes start (see ``EnvConfig.train_seed``)."""
    k = 0
    while True:
        yield env_cfg.train_seed + (k % env_cfg.train_levels if env_cfg.train_levels else k)
        k += 1


class SeededVectorEnv:
    """``num_envs`` copies stepped together; a copy whose episode ends restarts at once (in the same step)
    with the next seed of ``seeds``, so every training episode's seed is known.

    A thin layer over gymnasium's ``SyncVectorEnv`` with its own autoreset off: gymnasium's autoreset
    cannot pass a seed to each new episode."""

    def __init__(self, env_cfg: EnvConfig, seeds: Iterator[int], num_envs: int | None = None):
        self.num_envs = num_envs or env_cfg.num_envs
        self.envs = gym.vector.SyncVectorEnv([lambda: make_env(env_cfg)] * self.num_envs,
                                             autoreset_mode=gym.vector.AutoresetMode.DISABLED)
        self.seeds = seeds
        self.returns = np.zeros(self.num_envs)
        self.lengths = np.zeros(self.num_envs, dtype=np.int64)

    @property
    def single_observation_space(self) -> gym.Space:
        return self.envs.single_observation_space

    @property
    def single_action_space(self) -> gym.Space:
        return self.envs.single_action_space

    def reset(self) -> np.ndarray:
        """Start every copy on its next seed; the observations (num_envs, ...)."""
        obs, _ = self.envs.reset(seed=[next(self.seeds) for _ in range(self.num_envs)])
        self.returns[:] = 0
        self.lengths[:] = 0
        return obs

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[float, int]]]:
        """(observations, rewards, done flags, [(return, length) of each episode that ended]); a done copy's
        observation is already its next episode's first."""
        obs, rewards, terminated, truncated, _ = self.envs.step(actions)
        done = terminated | truncated
        self.returns += rewards
        self.lengths += 1
        finished = [(float(self.returns[i]), int(self.lengths[i])) for i in np.flatnonzero(done)]
        if done.any():
            seeds = [next(self.seeds) if d else None for d in done]
            fresh, _ = self.envs.reset(seed=seeds, options={"reset_mask": done})
            obs = np.where(done.reshape((-1,) + (1,) * (obs.ndim - 1)), fresh, obs)
            self.returns[done] = 0
            self.lengths[done] = 0
        return obs, rewards, done, finished

    def close(self) -> None:
        self.envs.close()


class EpisodeReturns(NamedTuple):
    """What :func:`episode_returns` measured: one return per seed, in the seeds' order, and the environment
    steps it took (the cost of the evaluation)."""

    returns: np.ndarray
    steps: int


def inverse_cdf(logits: torch.Tensor, uniforms: np.ndarray) -> np.ndarray:
    """The actions (..., B) that uniforms (B,) in [0, 1) select from softmax(logits) (..., B, A) by inverse
    CDF: a draw from each row's distribution, and the same uniform gives the same action for the same
    distribution (leading axes share the row's uniform: coupled draws)."""
    probs = torch.softmax(logits.double(), dim=-1).cpu().numpy()
    actions = (probs.cumsum(axis=-1) < uniforms[:, None]).sum(axis=-1)
    return np.minimum(actions, probs.shape[-1] - 1)


def _sampled(policy: Policy, batch: torch.Tensor, rngs: list[np.random.Generator]) -> np.ndarray:
    """One action per row drawn with that row's own generator (inverse CDF), so an episode's draws do not
    depend on which other episodes share the batch. A policy with ``sample_actions(obs, uniforms)`` (an
    ensemble whose members each draw) draws by itself from the same uniforms."""
    uniforms = np.array([rng.random() for rng in rngs])
    if hasattr(policy, "sample_actions"):
        return policy.sample_actions(batch, uniforms)
    return inverse_cdf(policy(batch), uniforms)


@torch.no_grad()
def episode_returns(policy: Policy, env_cfg: EnvConfig, seeds: Sequence[int], num_envs: int | None = None,
                    deterministic: bool | None = None, device: str | torch.device = "cpu") -> EpisodeReturns:
    """Play one episode per seed (episode i always starts from ``seeds[i]``: common random numbers) and return
    their undiscounted returns and the steps taken.

    Up to ``num_envs`` (default ``env_cfg.num_envs``) episodes run side by side and the policy sees their
    observations as one batch; a copy that finishes starts the next seed's episode. Actions are the argmax
    of the logits (ties: the lowest index) or, with ``deterministic=False``, drawn from their softmax with a
    generator keyed by the episode's seed (default: as ``env_cfg.actions`` says); either way the returns do
    not depend on ``num_envs``. ``policy`` maps float32 observations (B, ...) on ``device`` to logits (B, A)."""
    if deterministic is None:
        deterministic = env_cfg.actions == "greedy"
    seeds = [int(s) for s in seeds]
    slots = min(num_envs or env_cfg.num_envs, len(seeds)) or 1
    envs = [make_env(env_cfg) for _ in range(slots)]
    returns = np.zeros(len(seeds))
    steps = 0
    episode = [-1] * slots  # the episode each copy plays; -1: idle
    obs: list[np.ndarray | None] = [None] * slots
    rngs: list[np.random.Generator | None] = [None] * slots
    upcoming = iter(range(len(seeds)))

    def start(slot: int) -> None:
        i = next(upcoming, -1)
        episode[slot] = i
        if i >= 0:
            obs[slot], _ = envs[slot].reset(seed=seeds[i])
            rngs[slot] = None if deterministic else np.random.default_rng([seeds[i], _ACTION_STREAM])

    try:
        for slot in range(slots):
            start(slot)
        while True:
            active = [slot for slot in range(slots) if episode[slot] >= 0]
            if not active:
                break
            batch = torch.as_tensor(np.stack([obs[s] for s in active]), dtype=torch.float32, device=device)
            if deterministic:
                actions = policy(batch).argmax(dim=-1).cpu().numpy()
            else:
                actions = _sampled(policy, batch, [rngs[s] for s in active])
            for slot, action in zip(active, actions):
                obs[slot], reward, terminated, truncated, _ = envs[slot].step(int(action))
                returns[episode[slot]] += float(reward)
                steps += 1
                if terminated or truncated:
                    start(slot)
    finally:
        for env in envs:
            env.close()
    return EpisodeReturns(returns, steps)

