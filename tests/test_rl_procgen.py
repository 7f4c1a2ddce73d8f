"""ProcGen through EnvPool: a seed is a level, an episode is a function of its level (whatever the number of
copies or the episodes before it), and a tiny run with the IMPALA policy goes from PPO to test metrics.

EnvPool and the system Qt 5 runtime its ProcGen links against are test requirements (the test extra; `make
test` installs libqt5gui5 as root, as CI does): these tests fail without them rather than skip, and the
first names what is missing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import evo_subens
from evo_subens.core.config import config_from_dict
from evo_subens.core.worker import torch_threads
from evo_subens.errors import ConfigError
from evo_subens.tasks.rl.config import PROCGEN_GAMES, EnvConfig, PolicyConfig
from evo_subens.tasks.rl.envs import SeededVectorEnv, env_spaces, episode_returns, make_env, training_seeds
from evo_subens.tasks.rl.policies import build_policy

# The ProcGen protocol's split: 200 training levels, validation and test levels that training never plays.
LEVELS = {"train_seed": 0, "train_levels": 200, "validation_seed": 200_000, "test_seed": 300_000}
BIGFISH = EnvConfig(id="procgen:bigfish", num_envs=2, max_episode_steps=150, **LEVELS)

TINY_PROCGEN = {
    "task": "rl", "seed": 0,
    "env": {"id": "procgen:bigfish", "num_envs": 2, "validation_episodes": 2, "test_episodes": 2,
            "max_episode_steps": 50, **LEVELS},
    "ppo": {"total_steps": 256, "num_steps": 64, "update_epochs": 1, "num_minibatches": 2, "lr": 5e-4,
            "gamma": 0.999},
    "policy": {"name": "impala_cnn", "channels": [4, 8], "hidden": [32]},
    "children": {"family": "noisy", "layers": ["classifier.weight"], "density": 1.0, "sigma": 0.1,
                 "sigma_mode": "absolute"},
    "search": {"population": 2, "generations": 1, "elites": 1, "fitness": "return", "patience": 0},
    "workers": {"executor": "local"},
    "finetune": {"epochs": 0},
    "ensemble": {"size": 2, "holdout": 0.0, "rule": "gated"},
}


def _policy(name: str = "impala_cnn", **sizes) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_policy(PolicyConfig(name=name, **sizes), *env_spaces(BIGFISH)).eval()


def test_unknown_procgen_games_and_levels_beyond_an_int_are_refused() -> None:
    with pytest.raises(ConfigError, match="procgen:<game> with a game among bigfish, bossfight, .*starpilot"):
        EnvConfig(id="procgen:pong").check()
    with pytest.raises(ValueError, match="unknown ProcGen game 'pong'; one of bigfish"):
        make_env(EnvConfig(id="procgen:pong"))
    with pytest.raises(ConfigError, match="env.test_seed"):
        EnvConfig(id="procgen:coinrun", test_seed=2**31 - 10, test_episodes=100).check()
    for game in PROCGEN_GAMES:
        EnvConfig(id=f"procgen:{game}", **LEVELS).check()
    with pytest.raises(ConfigError, match="validation seeds .* disjoint from the training seeds"):
        EnvConfig(id="procgen:coinrun", train_seed=0, train_levels=200, validation_seed=150).check()


@pytest.mark.slow
def test_envpool_procgen_is_installed() -> None:
    """EnvPool imports and makes a ProcGen game: fails (never skips) without envpool or the Qt 5 runtime."""
    env = make_env(EnvConfig(id="procgen:coinrun"))
    try:
        obs, info = env.reset(seed=7)
        assert obs.shape == (3, 64, 64) and obs.dtype == np.uint8 and info["level"] == 7
        assert env_spaces(EnvConfig(id="procgen:coinrun")) == ((3, 64, 64), 15)
        obs, reward, terminated, truncated, _ = env.step(0)
        assert obs.shape == (3, 64, 64) and isinstance(reward, float)
    finally:
        env.close()


def _frames(env, seed: int, actions: np.ndarray) -> np.ndarray:
    obs, _ = env.reset(seed=seed)
    frames = [obs]
    for action in actions:
        obs, _, terminated, truncated, _ = env.step(int(action))
        frames.append(obs)
        if terminated or truncated:
            break
    return np.stack(frames)


@pytest.mark.slow
def test_an_episode_is_its_level_whatever_came_before() -> None:
    actions = np.random.default_rng(0).integers(0, 15, 100)
    reused, fresh = make_env(BIGFISH), make_env(BIGFISH)
    try:
        first = _frames(reused, 200_000, actions)
        _frames(reused, 200_001, actions[::-1])  # another level in between
        np.testing.assert_array_equal(_frames(reused, 200_000, actions), first)
        np.testing.assert_array_equal(_frames(reused, 200_000, actions), first)  # the same level, reused
        np.testing.assert_array_equal(_frames(fresh, 200_000, actions), first)
        assert not np.array_equal(_frames(fresh, 200_001, actions)[0], first[0])  # another level looks different
    finally:
        reused.close()
        fresh.close()


@pytest.mark.slow
def test_procgen_episode_returns_do_not_depend_on_the_number_of_copies() -> None:
    policy = _policy("impala_cnn", channels=[4, 8], hidden=[32])
    seeds = BIGFISH.validation_seeds[:1] + list(range(200_000, 200_006))
    with torch_threads(1):  # as in a worker (threads_per_actor): see ProcgenLevels on OpenMP's spinning threads
        for deterministic in (True, False):
            one = episode_returns(policy, BIGFISH, seeds, num_envs=1, deterministic=deterministic)
            two = episode_returns(policy, BIGFISH, seeds, num_envs=2, deterministic=deterministic)
            again = episode_returns(policy, BIGFISH, seeds, num_envs=2, deterministic=deterministic)
            np.testing.assert_array_equal(one.returns, two.returns)
            np.testing.assert_array_equal(two.returns, again.returns)
            assert one.steps == two.steps == again.steps
    assert one.returns[0] == one.returns[1]  # seed 200000 twice: the same level, the same episode
    assert np.ptp(one.returns) > 0 or np.ptp(two.returns) > 0  # the levels differ (not all zero returns)


@pytest.mark.slow
def test_training_copies_play_the_training_levels_in_order() -> None:
    cfg = EnvConfig(id="procgen:bigfish", max_episode_steps=3, train_seed=0, train_levels=3, validation_seed=3,
                    test_seed=100)
    envs = SeededVectorEnv(cfg, training_seeds(cfg), num_envs=2)
    try:
        obs = envs.reset()
        assert obs.shape == (2, 3, 64, 64) and obs.dtype == np.uint8
        levels = [[env.unwrapped.level for env in envs.envs.envs]]
        for _ in range(6):
            obs, _, done, _ = envs.step(np.zeros(2, dtype=np.int64))
            if done.any():
                levels.append([env.unwrapped.level for env in envs.envs.envs])
        assert levels == [[0, 1], [2, 0], [1, 2]]  # cycling through train_levels, one level per episode
        reference = make_env(cfg)
        np.testing.assert_array_equal(obs[0], reference.reset(seed=1)[0])
        reference.close()
    finally:
        envs.close()


@pytest.mark.slow
def test_tiny_procgen_run_with_the_impala_policy(tmp_path) -> None:
    config = dict(TINY_PROCGEN, output_dir=str(tmp_path / "runs"))
    config_from_dict(config)
    with torch_threads(1):  # PPO runs in this process: one torch thread leaves EnvPool's thread a core
        result = evo_subens.run(config)
    population, metrics = result.population, result.metrics
    assert len(population) == 1 + 2 and "val_return" in population.columns
    for who in (metrics["parent"], metrics["ensemble"]):
        assert who["test"]["episodes"] == 2
    assert "gated" in metrics["ensembles"]
    assert metrics["cost"]["parent_env_steps"] == 256


def test_the_procgen_recipe_is_a_valid_config() -> None:
    from conftest import REPO

    cfg = config_from_dict(__import__("yaml").safe_load((REPO / "configs" / "procgen.yaml").read_text()))
    assert cfg.env.id == "procgen:coinrun" and cfg.policy.name == "impala_cnn" and cfg.ensemble.rule == "gated"
    assert (cfg.env.train_seed, cfg.env.train_levels) == (0, 200)
