"""Config sections of the reinforcement-learning task: the environment, PPO and the policy network.

Seeds are what keeps decisions honest in RL the way splits do in classification: training episodes,
the validation episodes that score candidates and the test episodes of the final metrics are played
with three disjoint sets of seeds (:meth:`EnvConfig.check`), so a candidate is never chosen on the
episodes it is finally measured on, and every candidate is scored on the same validation episodes
(common random numbers).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...core.options import option
from ...errors import ConfigError

MINATAR_GAMES = ("asterix", "breakout", "freeway", "seaquest", "space_invaders")
PROCGEN_GAMES = ("bigfish", "bossfight", "caveflyer", "chaser", "climber", "coinrun", "dodgeball", "fruitbot",
                 "heist", "jumper", "leaper", "maze", "miner", "ninja", "plunder", "starpilot")
# ProcGen names a level by a C int: seeds (levels) of a procgen:<game> environment stay below this.
PROCGEN_LEVELS = 2**31 - 1
POLICIES = ("mlp", "minatar_cnn", "nature_cnn", "impala_cnn")


def seed_range(first: int, count: int | None) -> tuple[int, float]:
    """The half-open interval ``[first, first + count)`` of seeds; ``count`` None: unbounded above."""
    return first, float("inf") if count is None else first + count


def _overlap(a: tuple[int, float], b: tuple[int, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1] and a[0] < a[1] and b[0] < b[1]


def _show(interval: tuple[int, float]) -> str:
    end = "inf" if interval[1] == float("inf") else str(int(interval[1]))
    return f"[{interval[0]}, {end})"


@dataclass
class EnvConfig:
    """The environment: which one, how many copies per process, and the seeds of each kind of episode."""

    id: str = option("CartPole-v1", "a gymnasium id (CartPole-v1, Acrobot-v1, ...), minatar:<game> "
                     f"({', '.join(MINATAR_GAMES)}) or procgen:<game>, easy mode through EnvPool, where a "
                     f"seed is a level ({', '.join(PROCGEN_GAMES)})")
    num_envs: int = option(8, "vectorised copies of the environment per process (training and scoring)", ge=1)
    train_seed: int = option(1_000_000, "first training seed: the k-th training episode to start (over all "
                             "copies) is played with seed train_seed + k (modulo train_levels when set)", ge=0)
    train_levels: int | None = option(None, "distinct training seeds, cycled (ProcGen's num_levels, e.g. "
                                      "200); null = every training episode gets a new seed", ge=1)
    validation_episodes: int = option(32, "episodes that score every candidate (one per seed, same for all)",
                                      ge=1)
    validation_seed: int = option(0, "first validation seed: validation episode i uses validation_seed + i",
                                  ge=0)
    test_episodes: int = option(100, "episodes of the final test metrics (one per seed)", ge=1)
    test_seed: int = option(10_000, "first test seed: test episode i uses test_seed + i", ge=0)
    max_episode_steps: int | None = option(None, "cap on an episode's steps (truncation); null = the "
                                           "environment's own limit", ge=1)
    actions: str = option("greedy", "how a policy acts when it is scored and tested: greedy (the argmax) or "
                          "sampled (drawn from its action distribution with a generator keyed by the episode's "
                          "seed, so a return stays a function of policy and seed; ProcGen policies are "
                          "evaluated sampled, greedy ones get stuck)", choices=("greedy", "sampled"))

    @property
    def validation_seeds(self) -> list[int]:
        """The seeds of the validation episodes, in order."""
        return list(range(self.validation_seed, self.validation_seed + self.validation_episodes))

    @property
    def test_seeds(self) -> list[int]:
        """The seeds of the test episodes, in order."""
        return list(range(self.test_seed, self.test_seed + self.test_episodes))

    def check(self, prefix: str = "env") -> None:
        """Refuse an environment id this package cannot make and seed sets that overlap."""
        kind, sep, game = self.id.partition(":")
        if sep and kind == "procgen" and game not in PROCGEN_GAMES:
            raise ConfigError(f"{prefix}.id", "procgen:<game> with a game among " + ", ".join(PROCGEN_GAMES),
                              self.id)
        if sep and kind == "minatar" and game not in MINATAR_GAMES:
            raise ConfigError(f"{prefix}.id", "minatar:<game> with a game among " + ", ".join(MINATAR_GAMES),
                              self.id)
        train = seed_range(self.train_seed, self.train_levels)
        validation = seed_range(self.validation_seed, self.validation_episodes)
        test = seed_range(self.test_seed, self.test_episodes)
        if _overlap(validation, test):
            raise ConfigError(f"{prefix}.test_seed", f"test seeds {_show(test)} disjoint from the validation "
                              f"seeds {_show(validation)} (final metrics on the episodes candidates were "
                              "chosen on would flatter the ensemble)", self.test_seed)
        for name, interval, first in (("validation", validation, self.validation_seed),
                                      ("test", test, self.test_seed)):
            if _overlap(interval, train):
                raise ConfigError(f"{prefix}.{name}_seed", f"{name} seeds {_show(interval)} disjoint from the "
                                  f"training seeds {_show(train)} (train_seed, train_levels): scoring on "
                                  "training episodes rewards memorising them", first)
        if sep and kind == "procgen":
            for name, interval, first in (("train", train, self.train_seed),
                                          ("validation", validation, self.validation_seed),
                                          ("test", test, self.test_seed)):
                end = first + 1 if interval[1] == float("inf") else interval[1]  # unbounded: the first
                if end > PROCGEN_LEVELS:
                    raise ConfigError(f"{prefix}.{name}_seed", f"{name} seeds {_show(interval)} below "
                                      f"{PROCGEN_LEVELS} (a ProcGen level is a C int)", first)


@dataclass
class PPOConfig:
    """Proximal Policy Optimisation (CleanRL's ppo.py defaults; the ProcGen recipe in the docs)."""

    total_steps: int = option(100_000, "environment steps of training, over all copies", ge=0)
    num_steps: int = option(128, "rollout length per environment copy (one batch: num_envs * num_steps)", ge=1)
    lr: float = option(2.5e-4, "Adam learning rate (2.5e-4 for CartPole-style tasks; the ProcGen recipe "
                       "uses 5e-4)", gt=0)
    anneal_lr: bool = option(True, "decay the learning rate linearly to 0 over total_steps")
    gamma: float = option(0.99, "discount factor (ProcGen recipe: 0.999)", ge=0, le=1)
    gae_lambda: float = option(0.95, "GAE lambda", ge=0, le=1)
    clip: float = option(0.2, "surrogate clipping coefficient (also clips the value loss)", gt=0)
    ent_coef: float = option(0.01, "entropy bonus coefficient", ge=0)
    vf_coef: float = option(0.5, "value loss coefficient", ge=0)
    update_epochs: int = option(4, "passes over each batch (ProcGen recipe: 3)", ge=1)
    num_minibatches: int = option(4, "minibatches each batch is split into", ge=1)
    max_grad_norm: float = option(0.5, "gradient clipping by global norm", gt=0)
    norm_adv: bool = option(True, "normalise advantages per minibatch")


@dataclass
class PolicyConfig:
    """The actor-critic network; the actor's logits are what the engine perturbs and ensembles."""

    name: str = option("mlp", "policy network", choices=POLICIES)
    hidden: list | None = option(None, "widths of the hidden fully connected layers; null = the network's "
                                 "own (mlp [64, 64], minatar_cnn [128], nature_cnn [256], impala_cnn [256])")
    channels: list | None = option(None, "conv channels; null = the network's own (minatar_cnn [16], "
                                   "nature_cnn [16, 32], impala_cnn [16, 32, 32]); mlp has none")

    def check(self, prefix: str = "policy") -> None:
        """Refuse sizes that are not positive whole numbers, and conv channels for the mlp."""
        for name in ("hidden", "channels"):
            values = getattr(self, name)
            if values is not None and not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                               for v in values):
                raise ConfigError(f"{prefix}.{name}", "a list of whole numbers > 0", values)
        if self.name == "mlp" and self.channels is not None:
            raise ConfigError(f"{prefix}.channels", "null for policy.name 'mlp' (it has no conv layers)",
                              self.channels)
        if self.name == "nature_cnn" and self.channels is not None and len(self.channels) != 2:
            raise ConfigError(f"{prefix}.channels", "two values for nature_cnn (its 8x8/4 and 4x4/2 convs)",
                              self.channels)
        if self.name in ("minatar_cnn", "impala_cnn") and self.channels is not None and not self.channels:
            raise ConfigError(f"{prefix}.channels", "at least one value", self.channels)
