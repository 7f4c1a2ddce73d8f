"""Actor-critic policies for discrete actions: a shared body, a critic head and an actor head.

``forward(obs)`` returns the actor's action logits, so a policy is a classifier of observations and the
engine's families perturb it like one: the actor head is an ``nn.Linear`` named ``classifier`` and
registered last, which is the output layer :func:`evo_subens.nn.output_parameter_names` finds (a family that
spares or targets the output layer then spares or targets the actor, never the critic). ``value(obs)`` is
the critic's estimate, used by PPO only.

Observations are float32 and channels-first, (C, H, W) for images (see :mod:`.envs`). The pixel networks
(:class:`NatureCNN`, :class:`ImpalaCNN`) divide their input by ``scale`` (255: raw pixel values).
Initialisation follows CleanRL: orthogonal weights, gain sqrt(2) in the body, 0.01 for the actor (near-uniform
first policy) and 1 for the critic.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .config import PolicyConfig


def layer_init(layer: nn.Module, std: float = math.sqrt(2), bias: float = 0.0) -> nn.Module:
    """Orthogonal weights with gain ``std`` and constant biases (CleanRL's ``layer_init``)."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


class ActorCritic(nn.Module):
    """``body`` (observations -> features of width ``features``), then the critic and the actor heads; the
    critic reads ``critic_body``'s features instead when a subclass sets one (separate networks).

    Subclasses build the bodies and call :meth:`_heads` last, so the actor is the last parameterised module."""

    body: nn.Module

    def __init__(self):
        super().__init__()
        # An instance attribute, not a class one: a class attribute would shadow the registered module.
        self.critic_body: nn.Module | None = None

    def _heads(self, features: int, num_actions: int) -> None:
        self.critic = layer_init(nn.Linear(features, 1), std=1.0)
        self.classifier = layer_init(nn.Linear(features, num_actions), std=0.01)  # the actor

    @property
    def actor(self) -> nn.Linear:
        """The actor head (registered as ``classifier``, the families' name for the output layer)."""
        return self.classifier

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """Action logits (B, A)."""
        return self.classifier(self.body(obs))

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        """The critic's state values (B,)."""
        return self.critic((self.critic_body or self.body)(obs)).squeeze(-1)

    def logits_and_value(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both heads, from one pass through a shared body (what PPO needs)."""
        features = self.body(obs)
        critic_features = features if self.critic_body is None else self.critic_body(obs)
        return self.classifier(features), self.critic(critic_features).squeeze(-1)


def _fully_connected(width: int, hidden: Sequence[int], activation: type[nn.Module]) -> tuple[list, int]:
    layers: list[nn.Module] = []
    for size in hidden:
        layers += [layer_init(nn.Linear(width, size)), activation()]
        width = size
    return layers, width


def _flat_size(body: nn.Module, obs_shape: Sequence[int]) -> int:
    with torch.no_grad():
        return int(body(torch.zeros(1, *obs_shape)).shape[-1])


class MLPPolicy(ActorCritic):
    """Flattened observations through tanh layers: CleanRL's ppo.py agent. Its actor and critic are separate
    networks by default (``shared=False``): sharing the hidden layers lets the value loss, large while
    CartPole's returns are in the hundreds, swamp the policy gradient under the global gradient clip (PPO for
    25k CartPole steps, seeds 0/1: greedy validation return 424/221 separate, 185/98 shared)."""

    def __init__(self, obs_shape: Sequence[int], num_actions: int, hidden: Sequence[int] = (64, 64),
                 shared: bool = False):
        super().__init__()
        layers, width = _fully_connected(math.prod(obs_shape), hidden, nn.Tanh)
        self.body = nn.Sequential(nn.Flatten(), *layers)
        if not shared:
            self.critic_body = nn.Sequential(nn.Flatten(), *_fully_connected(math.prod(obs_shape), hidden,
                                                                             nn.Tanh)[0])
        self._heads(width, num_actions)


class MinAtarCNN(ActorCritic):
    """MinAtar's network: 3x3 convolutions (stride 1, no padding; one of 16 channels by default), then a
    fully connected layer of 128."""

    def __init__(self, obs_shape: Sequence[int], num_actions: int, channels: Sequence[int] = (16,),
                 hidden: Sequence[int] = (128,)):
        super().__init__()
        convs: list[nn.Module] = []
        previous = obs_shape[0]
        for count in channels:
            convs += [layer_init(nn.Conv2d(previous, count, 3)), nn.ReLU()]
            previous = count
        convs.append(nn.Flatten())
        width = _flat_size(nn.Sequential(*convs), obs_shape)
        layers, width = _fully_connected(width, hidden, nn.ReLU)
        self.body = nn.Sequential(*convs, *layers)
        self._heads(width, num_actions)


class _Scale(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.scale


class NatureCNN(ActorCritic):
    """The small DQN-paper network: conv 16 8x8 stride 4, conv 32 4x4 stride 2, fully connected 256."""

    def __init__(self, obs_shape: Sequence[int], num_actions: int, channels: Sequence[int] = (16, 32),
                 hidden: Sequence[int] = (256,), scale: float = 255.0):
        super().__init__()
        first, second = channels
        convs = [_Scale(scale), layer_init(nn.Conv2d(obs_shape[0], first, 8, stride=4)), nn.ReLU(),
                 layer_init(nn.Conv2d(first, second, 4, stride=2)), nn.ReLU(), nn.Flatten()]
        layers, width = _fully_connected(_flat_size(nn.Sequential(*convs), obs_shape), hidden, nn.ReLU)
        self.body = nn.Sequential(*convs, *layers)
        self._heads(width, num_actions)


class ResidualBlock(nn.Module):
    """relu, conv 3x3, relu, conv 3x3, plus the input (IMPALA)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv0 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv1(torch.relu(self.conv0(torch.relu(x))))


class ConvSequence(nn.Sequential):
    """conv 3x3, max-pool 3x3 stride 2 (halves the size), two residual blocks (IMPALA)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.Conv2d(in_channels, out_channels, 3, padding=1),
                         nn.MaxPool2d(3, stride=2, padding=1),
                         ResidualBlock(out_channels), ResidualBlock(out_channels))


class ImpalaCNN(ActorCritic):
    """The IMPALA network of CleanRL's ppo_procgen: one conv sequence per entry of ``channels``, then relu,
    fully connected 256, relu. Convolutions keep PyTorch's default initialisation there, and here."""

    def __init__(self, obs_shape: Sequence[int], num_actions: int, channels: Sequence[int] = (16, 32, 32),
                 hidden: Sequence[int] = (256,), scale: float = 255.0):
        super().__init__()
        convs: list[nn.Module] = [_Scale(scale)]
        previous = obs_shape[0]
        for count in channels:
            convs.append(ConvSequence(previous, count))
            previous = count
        convs += [nn.Flatten(), nn.ReLU()]
        layers, width = _fully_connected(_flat_size(nn.Sequential(*convs), obs_shape), hidden, nn.ReLU)
        self.body = nn.Sequential(*convs, *layers)
        self._heads(width, num_actions)


POLICY_CLASSES: dict[str, type[ActorCritic]] = {"mlp": MLPPolicy, "minatar_cnn": MinAtarCNN,
                                                "nature_cnn": NatureCNN, "impala_cnn": ImpalaCNN}


def build_policy(cfg: PolicyConfig, obs_shape: Sequence[int], num_actions: int) -> ActorCritic:
    """The policy ``cfg.name`` for observations of ``obs_shape`` (channels first) and ``num_actions`` actions;
    ``cfg.hidden`` / ``cfg.channels`` replace the network's own sizes when given."""
    cfg.check()
    sizes = {key: tuple(value) for key, value in (("hidden", cfg.hidden), ("channels", cfg.channels))
             if value is not None}
    return POLICY_CLASSES[cfg.name](tuple(obs_shape), num_actions, **sizes)
