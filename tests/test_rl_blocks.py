"""The reinforcement-learning building blocks: config sections and their seed sets, seeded environments and
episode returns, actor-critic policies, PPO, ensemble action rules and return statistics."""

from __future__ import annotations

import dataclasses

import json
import math
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")

from evo_subens.core.options import build_section  # noqa: E402
from evo_subens.core.worker import torch_threads  # noqa: E402
from evo_subens.errors import ConfigError  # noqa: E402
from evo_subens.nn import output_parameter_names  # noqa: E402
from evo_subens.tasks.rl import ensemble as ens  # noqa: E402
from evo_subens.tasks.rl.config import EnvConfig, PolicyConfig, PPOConfig  # noqa: E402
from evo_subens.tasks.rl.envs import (SeededVectorEnv, env_spaces, episode_returns, make_env,  # noqa: E402
                                       training_seeds)
from evo_subens.tasks.rl.policies import build_policy  # noqa: E402
from evo_subens.tasks.rl.ppo import train_ppo  # noqa: E402
from evo_subens.tasks.rl.stats import bootstrap_ci, iqm, summarise  # noqa: E402

CARTPOLE = EnvConfig(id="CartPole-v1", num_envs=4)


def _cartpole_policy(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_policy(PolicyConfig(name="mlp"), *env_spaces(CARTPOLE))


# Config: seed sets -----------------------------------------------------------------------------------------


def test_default_seed_sets_are_disjoint() -> None:
    cfg = build_section(EnvConfig, {}, "env")
    cfg.check()
    validation, test = set(cfg.validation_seeds), set(cfg.test_seeds)
    assert len(validation) == cfg.validation_episodes and len(test) == cfg.test_episodes
    assert not validation & test
    assert min(validation | test) >= 0 and max(validation | test) < cfg.train_seed  # training seeds go upwards


@pytest.mark.parametrize("fields, field, words", [
    ({"test_seed": 10}, "env.test_seed", "test seeds [10, 110) disjoint from the validation seeds [0, 32)"),
    ({"validation_seed": 2_000_000}, "env.validation_seed",
     "validation seeds [2000000, 2000032) disjoint from the training seeds [1000000, inf)"),
    ({"train_seed": 0, "train_levels": 600, "validation_seed": 500}, "env.validation_seed",
     "validation seeds [500, 532) disjoint from the training seeds [0, 600)"),
    ({"train_seed": 10_050, "train_levels": 10}, "env.test_seed",
     "test seeds [10000, 10100) disjoint from the training seeds [10050, 10060)"),
])
def test_overlapping_seed_sets_are_refused_naming_the_field(fields: dict, field: str, words: str) -> None:
    cfg = build_section(EnvConfig, fields, "env")
    with pytest.raises(ConfigError, match="config field '" + field.replace(".", r"\.") + "'") as error:
        cfg.check()
    assert words in str(error.value)


def test_train_levels_cycle_a_bounded_seed_set() -> None:
    cfg = EnvConfig(train_seed=0, train_levels=3, validation_seed=3, test_seed=100)
    cfg.check()  # training seeds [0, 3) end where validation's begin
    seeds = training_seeds(cfg)
    assert [next(seeds) for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    unbounded = training_seeds(EnvConfig(train_seed=5))
    assert [next(unbounded) for _ in range(3)] == [5, 6, 7]


def test_unknown_minatar_games_are_refused_clearly() -> None:
    with pytest.raises(ConfigError, match="game among asterix, breakout"):
        EnvConfig(id="minatar:pong").check()


def test_policy_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="policy.name"):
        build_section(PolicyConfig, {"name": "lstm"}, "policy")
    with pytest.raises(ConfigError, match="policy.channels.*null for policy.name 'mlp'"):
        PolicyConfig(name="mlp", channels=[8]).check()
    with pytest.raises(ConfigError, match="policy.channels.*two values"):
        PolicyConfig(name="nature_cnn", channels=[8]).check()
    with pytest.raises(ConfigError, match="policy.hidden.*whole numbers > 0"):
        PolicyConfig(hidden=[64, 0]).check()


# Environments and episode returns ----------------------------------------------------------------------------


def test_episode_returns_do_not_depend_on_the_number_of_copies() -> None:
    policy = _cartpole_policy()
    seeds = list(range(12))
    greedy = {}
    for deterministic in (True, False):
        one = episode_returns(policy, CARTPOLE, seeds, num_envs=1, deterministic=deterministic)
        four = episode_returns(policy, CARTPOLE, seeds, num_envs=4, deterministic=deterministic)
        np.testing.assert_array_equal(one.returns, four.returns)
        assert one.steps == four.steps == one.returns.sum()  # CartPole: reward 1 per step
        greedy.setdefault("returns", one.returns)
    # Each episode is a function of its own seed: a subset, reordered, gives the same returns.
    again = episode_returns(policy, CARTPOLE, [7, 3], num_envs=2)
    np.testing.assert_array_equal(again.returns, greedy["returns"][[7, 3]])


def test_episode_returns_respect_the_step_cap() -> None:
    capped = EnvConfig(id="CartPole-v1", max_episode_steps=5)
    result = episode_returns(_cartpole_policy(), capped, [0, 1, 2], num_envs=2)
    assert result.returns.tolist() == [5.0, 5.0, 5.0] and result.steps == 15


_OTHER_PROCESS = """
import sys, torch
from evo_subens.tasks.rl.config import EnvConfig, PolicyConfig
from evo_subens.tasks.rl.envs import env_spaces, episode_returns
from evo_subens.tasks.rl.policies import build_policy
cfg = EnvConfig(id="CartPole-v1")
policy = build_policy(PolicyConfig(), *env_spaces(cfg))
policy.load_state_dict(torch.load(sys.argv[1]))
print(episode_returns(policy, cfg, range(10), num_envs=3).returns.tolist())
"""


@pytest.mark.slow
def test_episode_returns_repeat_in_another_process(tmp_path) -> None:
    policy = _cartpole_policy(seed=3)  # untrained: short episodes, whose lengths still differ between seeds
    torch.save(policy.state_dict(), tmp_path / "policy.pt")
    here = episode_returns(policy, CARTPOLE, range(10), num_envs=1).returns.tolist()
    assert len(set(here)) > 1
    out = subprocess.run([sys.executable, "-c", _OTHER_PROCESS, str(tmp_path / "policy.pt")], capture_output=True,
                         text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here


def test_training_copies_start_every_episode_from_the_next_seed() -> None:
    cfg = EnvConfig(id="CartPole-v1", max_episode_steps=3, train_seed=100)
    envs = SeededVectorEnv(cfg, training_seeds(cfg), num_envs=2)
    reference = make_env(cfg)
    try:
        obs = envs.reset()
        np.testing.assert_array_equal(obs[1], reference.reset(seed=101)[0])
        finished = []
        for _ in range(3):
            obs, _, done, ended = envs.step(np.zeros(2, dtype=np.int64))
            finished += ended
        assert done.all() and finished == [(3.0, 3), (3.0, 3)]
        # Both copies restarted in that step, on seeds 102 and 103, and their observations are already those.
        np.testing.assert_array_equal(obs[0], reference.reset(seed=102)[0])
        np.testing.assert_array_equal(obs[1], reference.reset(seed=103)[0])
    finally:
        envs.close()
        reference.close()


@pytest.mark.slow
def test_minatar_episodes_are_channels_first_and_a_function_of_their_seed() -> None:
    pytest.importorskip("minatar")
    cfg = EnvConfig(id="minatar:breakout", max_episode_steps=300)
    obs_shape, actions = env_spaces(cfg)
    assert obs_shape == (4, 10, 10) and actions == 3
    torch.manual_seed(0)
    policy = build_policy(PolicyConfig(name="minatar_cnn"), obs_shape, actions)
    # Sampled actions end episodes on different actions, which MinAtar's sticky action would carry into the
    # next episode of the same copy without the reset wrapper.
    one = episode_returns(policy, cfg, range(8), num_envs=1, deterministic=False)
    three = episode_returns(policy, cfg, range(8), num_envs=3, deterministic=False)
    np.testing.assert_array_equal(one.returns, three.returns)
    assert one.steps == three.steps
    # env.actions: sampled is what scoring and testing then play; greedy (the default) differs from it.
    sampled = dataclasses.replace(cfg, actions="sampled")
    np.testing.assert_array_equal(episode_returns(policy, sampled, range(8), num_envs=2).returns, one.returns)
    assert episode_returns(policy, cfg, range(8)).steps != one.steps


# Policies ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, obs_shape", [("mlp", (4,)), ("minatar_cnn", (4, 10, 10)),
                                             ("nature_cnn", (3, 64, 64)), ("impala_cnn", (3, 64, 64))])
def test_policies_return_logits_and_values_with_the_actor_as_output_layer(name: str, obs_shape: tuple) -> None:
    torch.manual_seed(0)
    policy = build_policy(PolicyConfig(name=name), obs_shape, 5)
    obs = torch.rand(3, *obs_shape) * (255 if name in ("nature_cnn", "impala_cnn") else 1)
    logits, value = policy.logits_and_value(obs)
    assert policy(obs).shape == logits.shape == (3, 5) and policy.value(obs).shape == value.shape == (3,)
    torch.testing.assert_close(policy(obs), logits)
    torch.testing.assert_close(policy.value(obs), value)
    assert output_parameter_names(policy) == ["classifier.weight", "classifier.bias"]
    assert policy.actor is policy.classifier
    with torch.no_grad():  # the output layer moves the logits, never the critic's values
        policy.classifier.weight.add_(1.0)
    assert not torch.allclose(policy(obs), logits)
    torch.testing.assert_close(policy.value(obs), value)


def test_build_policy_takes_the_configured_sizes() -> None:
    mlp = build_policy(PolicyConfig(name="mlp", hidden=[8]), (4,), 2)
    assert mlp.classifier.in_features == 8 and mlp.critic_body is not None
    impala = build_policy(PolicyConfig(name="impala_cnn", channels=[4, 8], hidden=[32]), (3, 64, 64), 15)
    assert impala.classifier.in_features == 32 and impala(torch.zeros(2, 3, 64, 64)).shape == (2, 15)


# PPO ---------------------------------------------------------------------------------------------------------

TINY_PPO = PPOConfig(total_steps=256, num_steps=32, update_epochs=2, num_minibatches=2)


def test_ppo_repeats_for_a_seed_and_calls_back() -> None:
    def run(seed: int) -> tuple[dict, dict, list, int]:
        policy = _cartpole_policy()
        updates, steps = [], []
        with torch_threads(1):
            stats = train_ppo(policy, CARTPOLE, TINY_PPO, seed=seed, progress=lambda line: None,
                              on_update=updates.append, after_step=steps.append)
        return policy.state_dict(), stats, updates, len(steps)

    first, stats, updates, optimiser_steps = run(0)
    second, _, _, _ = run(0)
    other, _, _, _ = run(1)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    assert stats["steps"] == 256 and stats["updates"] == 2 == len(updates) and updates[-1] == stats
    assert optimiser_steps == 2 * TINY_PPO.update_epochs * TINY_PPO.num_minibatches


def test_ppo_fine_tunes_with_a_mask_kept_and_stops_when_asked() -> None:
    policy = _cartpole_policy()
    mask = (torch.arange(policy.classifier.weight.numel()) % 2 == 0).reshape(policy.classifier.weight.shape)
    with torch.no_grad():
        policy.classifier.weight.mul_(mask)

    def reapply(model: torch.nn.Module) -> None:  # what a pruned child's tuning does after each step
        with torch.no_grad():
            model.classifier.weight.mul_(mask)

    lines: list[str] = []
    with torch_threads(1):
        stats = train_ppo(policy, CARTPOLE, TINY_PPO, seed=0, progress=lines.append, after_step=reapply,
                          on_update=lambda s: True)
    assert stats["updates"] == 1 and stats["steps"] == 128
    assert torch.all(policy.classifier.weight[~mask] == 0) and torch.any(policy.classifier.weight[mask] != 0)
    assert lines and "steps/s" in lines[-1] and "return" in lines[-1]


@pytest.mark.slow
def test_ppo_improves_cartpole_greedy_return() -> None:
    """25k steps: 6-11 s on one thread of the 2-core machine (20 s with both cores busy elsewhere); greedy
    validation return 9.8 -> 362 (seed 0)."""
    cfg = EnvConfig(id="CartPole-v1", num_envs=4)
    policy = _cartpole_policy()
    before = episode_returns(policy, cfg, cfg.validation_seeds).returns.mean()
    start = time.perf_counter()
    with torch_threads(1):
        stats = train_ppo(policy, cfg, PPOConfig(total_steps=25_000), seed=0, progress=lambda line: None)
    seconds = time.perf_counter() - start
    after = episode_returns(policy, cfg, cfg.validation_seeds).returns.mean()
    print(f"PPO CartPole {stats['steps']} steps in {seconds:.1f}s: greedy return {before:.1f} -> {after:.1f}")
    assert before < 50 and after > 150 and after > 5 * before


# Ensemble rules ----------------------------------------------------------------------------------------------


def _probs(rows: list[list[list[float]]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_mean_rule_averages_probabilities() -> None:
    # Member 0 leans to action 0, members 1 and 2 to action 1: mean (0.37, 0.53, 0.1) picks 1, a vote too.
    members = _probs([[[0.6, 0.4, 0.0]], [[0.3, 0.7, 0.0]], [[0.2, 0.5, 0.3]]])
    assert ens.mean_action(members).tolist() == ens.vote(members).tolist() == [1]
    # ...but a confident minority wins the mean where the majority barely leans.
    members = _probs([[[1.0, 0.0]], [[0.45, 0.55]], [[0.45, 0.55]]])
    assert ens.mean_action(members).tolist() == [0] and ens.vote(members).tolist() == [1]
    drawn = ens.mean_action(_probs([[[0.0, 1.0]], [[0.0, 1.0]]]), sample=True,
                            generator=torch.Generator().manual_seed(0))
    assert drawn.tolist() == [1]


def test_vote_ties_go_to_the_mean_winner_or_the_lowest_index() -> None:
    # Two members pick action 2, two pick action 1: a tie. Mean probabilities favour action 2.
    members = _probs([[[0.1, 0.2, 0.7]], [[0.1, 0.2, 0.7]], [[0.0, 0.55, 0.45]], [[0.0, 0.55, 0.45]]])
    assert ens.vote(members, tie="mean").tolist() == [2]
    assert ens.vote(members, tie="lowest").tolist() == [1]
    # A clear majority ignores the tie rule; a batch is voted row by row.
    batch = _probs([[[0.6, 0.4], [0.1, 0.9]], [[0.6, 0.4], [0.2, 0.8]], [[0.1, 0.9], [0.7, 0.3]]])
    assert ens.vote(batch, tie="mean").tolist() == ens.vote(batch, tie="lowest").tolist() == [0, 1]
    with pytest.raises(ValueError, match="tie must be one of"):
        ens.vote(members, tie="random")


def test_gate_opens_only_above_the_entropy_threshold() -> None:
    uniform, sure = [0.25] * 4, [0.97, 0.01, 0.01, 0.01]
    parent = _probs([uniform, sure])
    assert torch.allclose(ens.normalised_entropy(parent), torch.tensor([1.0, 0.1210]), atol=1e-4)
    # Members agree on action 3 everywhere; the parent keeps its sure row and hands over its uniform one.
    members = _probs([[[0.0, 0.0, 0.0, 1.0]] * 2] * 3)
    assert ens.gated(members, parent).tolist() == [3, 0]
    # Just below and above the threshold: normalised entropy of p = (1 - 3e, e, e, e).
    h = lambda e: ens.normalised_entropy(_probs([[1 - 3 * e, e, e, e]]))[0].item()  # noqa: E731
    assert h(0.20) < 0.975 < h(0.23)
    assert ens.gated(members[:, :1], _probs([[0.4, 0.2, 0.2, 0.2]])).tolist() == [0]
    assert ens.gated(members[:, :1], _probs([[0.31, 0.23, 0.23, 0.23]])).tolist() == [3]
    assert ens.gated(members[:, :1], _probs([[0.31, 0.23, 0.23, 0.23]]), threshold=0.999).tolist() == [0]
    assert ens.normalised_entropy(_probs([[1.0]])).tolist() == [0.0]


class _Fixed(torch.nn.Module):
    def __init__(self, logits: list[list[float]]):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.logits[: obs.shape[0]]


def test_ensemble_policy_acts_by_its_rule() -> None:
    obs = torch.zeros(2, 1)
    members = [_Fixed([[5.0, 0.0], [0.0, 5.0]]), _Fixed([[0.0, 1.0], [0.0, 1.0]]), _Fixed([[0.0, 1.0], [1.0, 0.0]])]
    parent = _Fixed([[0.0, 0.0], [3.0, 0.0]])  # unsure on row 0, sure of action 0 on row 1
    mean = ens.EnsemblePolicy(members, "mean")
    torch.testing.assert_close(mean(obs).exp(), mean.member_probs(obs).mean(0))
    assert mean(obs).argmax(-1).tolist() == [0, 1]
    assert ens.EnsemblePolicy(members, "vote")(obs).argmax(-1).tolist() == [1, 1]
    gated_policy = ens.EnsemblePolicy(members, "gated", parent=parent)
    gated = gated_policy(obs)
    assert gated.argmax(-1).tolist() == [1, 0]
    assert (gated_policy.consulted, gated_policy.decisions) == (1, 2)  # the members voted on row 0 only
    assert math.isinf(gated[0, 0].item())  # the vote is a certain choice; the parent's row keeps its probabilities
    torch.testing.assert_close(gated[1], torch.log_softmax(torch.tensor([3.0, 0.0]), -1))
    with pytest.raises(ValueError, match="needs the parent"):
        ens.EnsemblePolicy(members, "gated")
    # episode_returns plays an ensemble like one policy.
    policies = [_cartpole_policy(seed) for seed in range(3)]
    result = episode_returns(ens.EnsemblePolicy(policies, "vote"), CARTPOLE, [0, 1], num_envs=2)
    assert result.returns.shape == (2,) and result.steps > 0


def test_a_sampled_ensemble_votes_on_its_members_draws() -> None:
    """Sampled, every member draws with the observation's uniform and the majority acts; copies of one
    policy then act exactly as that policy sampled, whatever the rule."""
    obs = torch.zeros(2, 1)
    members = [_Fixed([[0.0, 0.0]] * 2), _Fixed([[math.log(9), 0.0]] * 2), _Fixed([[0.0, math.log(4)]] * 2)]
    # Probabilities [.5 .5], [.9 .1], [.2 .8]: u = 0.6 draws 1, 0, 1; u = 0.1 draws 0, 0, 0.
    uniforms = np.array([0.6, 0.1])
    assert ens.EnsemblePolicy(members, "vote").sample_actions(obs, uniforms).tolist() == [1, 0]
    assert ens.EnsemblePolicy(members, "mean").sample_actions(obs, uniforms).tolist() == [1, 0]  # mean [.53 .47]
    parent = _Fixed([[0.0, 0.0], [5.0, 0.0]])  # unsure on row 0 only
    gated = ens.EnsemblePolicy(members, "gated", parent=parent)
    assert gated.sample_actions(obs, np.array([0.6, 0.995])).tolist() == [1, 1]  # row 1: the parent's draw
    assert (gated.consulted, gated.decisions) == (1, 2)
    policy = _cartpole_policy(0)
    sampled = dataclasses.replace(CARTPOLE, actions="sampled")
    alone = episode_returns(policy, sampled, range(6), num_envs=2)
    for rule in ens.RULES:
        copies = ens.EnsemblePolicy([policy] * 3, rule, parent=policy)
        together = episode_returns(copies, sampled, range(6), num_envs=3)
        np.testing.assert_array_equal(together.returns, alone.returns)


# Statistics --------------------------------------------------------------------------------------------------


def test_iqm_is_the_mean_of_the_middle_half() -> None:
    assert iqm(np.arange(8)) == 3.5  # mean of 2, 3, 4, 5
    assert iqm([0, 0, 1, 1, 1, 1, 100, -100]) == 0.75  # the outliers are cut
    assert iqm(np.arange(10)) == 4.5  # floor(10 / 4) = 2 cut from each end, as scipy's trim_mean and rliable
    np.testing.assert_allclose(iqm(np.array([np.arange(8), np.arange(8) * 2]), axis=1), [3.5, 7.0])
    with pytest.raises(ValueError):
        iqm([])


def test_bootstrap_ci_is_seeded_and_covers_the_statistic() -> None:
    x = np.random.default_rng(0).normal(10.0, 2.0, size=200)
    low, high = bootstrap_ci(x, np.mean)
    assert low < x.mean() < high and (low, high) == bootstrap_ci(x, np.mean, seed=0)
    assert (low, high) != bootstrap_ci(x, np.mean, seed=1)
    # the normal-theory 95% half-width is 1.96 * sd / sqrt(n) ~ 0.28
    assert abs((high - low) / 2 - 1.96 * x.std() / np.sqrt(x.size)) < 0.05
    assert bootstrap_ci(x, np.mean, level=0.5)[1] - bootstrap_ci(x, np.mean, level=0.5)[0] < high - low
    # a stat without an axis argument gives the same interval, one resample at a time
    assert bootstrap_ci(x, iqm, n=300) == bootstrap_ci(x, lambda r: iqm(r), n=300)
    assert bootstrap_ci(np.full(5, 3.0), iqm) == (3.0, 3.0)


def test_summarise_reports_mean_median_iqm_and_intervals() -> None:
    summary = summarise(np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 100.0]))
    assert summary["episodes"] == 8 and summary["median"] == 3.5 and summary["iqm"] == 3.5
    assert summary["mean"] == pytest.approx(15.125)
    assert set(summary["ci95"]) == {"mean", "iqm"}
    low, high = summary["ci95"]["iqm"]
    assert low <= 3.5 <= high and all(isinstance(v, float) for v in (low, high))
