"""How an ensemble of policies acts: rules over the members' action probabilities.

Shapes: member probabilities (M, B, A) (M members, B observations, A actions), a parent's (B, A); every
rule returns one action per observation, (B,) long.

- ``mean``: the action of the mean of the members' probabilities (argmax, or drawn from it).
- ``vote``: the action most members rank first. Ties go to the tied action with the highest mean probability
  (``tie="mean"``, the default: it uses what the counts throw away), or to the lowest action index
  (``tie="lowest"``); a tie that remains under ``"mean"`` goes to the lowest index.
- ``gated``: the parent acts unless it is unsure, its normalised entropy H(p) / log(A) above ``threshold``
  (0.975: a near-uniform policy); then the members vote. This is the "pseudo-ensemble" of the ProcGen
  competition code (8 copies of the policy with 5% of the logits layer pruned, consulted only when unsure).

:class:`EnsemblePolicy` wraps members (and a parent) as one module whose ``forward(obs)`` returns the log of
its action distribution, so :func:`~.envs.episode_returns` plays it like a single policy: argmax gives the
rule's action. Sampled (``env.actions: sampled``), it draws through :meth:`EnsemblePolicy.sample_actions`:
from the mean (``mean``); or every member draws with the same uniform and the majority of those draws acts
(``vote``, and ``gated`` where the gate opens; elsewhere the parent draws). A vote of the members' argmax
actions would turn a sampled policy greedy.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .envs import inverse_cdf

RULES = ("mean", "vote", "gated")
TIES = ("mean", "lowest")
GATE_THRESHOLD = 0.975


def normalised_entropy(probs: torch.Tensor) -> torch.Tensor:
    """H(p) / log(A) over the last axis: 0 for a certain choice, 1 for a uniform one (0 when A is 1)."""
    actions = probs.shape[-1]
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)  # 0 log 0 counts as 0
    return entropy / math.log(actions) if actions > 1 else torch.zeros_like(entropy)


def mean_action(member_probs: torch.Tensor, sample: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The action of the mean probabilities: its argmax (ties: the lowest index), or a draw from it."""
    mean = member_probs.mean(0)
    if sample:
        return torch.multinomial(mean, 1, generator=generator).squeeze(-1)
    return mean.argmax(-1)


def vote(member_probs: torch.Tensor, tie: str = "mean", choices: torch.Tensor | None = None) -> torch.Tensor:
    """The majority of the members' actions ``choices`` (M, B) (default: their argmax actions); ``tie``:
    "mean" or "lowest" (see the module doc)."""
    if tie not in TIES:
        raise ValueError(f"tie must be one of {TIES}, got {tie!r}")
    actions = member_probs.shape[-1]
    choices = member_probs.argmax(-1) if choices is None else choices
    counts = nn.functional.one_hot(choices, actions).sum(0)  # (B, A)
    tied = counts == counts.max(-1, keepdim=True).values
    if tie == "lowest":
        return tied.int().argmax(-1)  # argmax returns the first maximal index
    scores = member_probs.mean(0).masked_fill(~tied, -math.inf)
    return scores.argmax(-1)


def gate(parent_probs: torch.Tensor, threshold: float = GATE_THRESHOLD) -> torch.Tensor:
    """(B,) bool: where the parent is too unsure to act alone (normalised entropy strictly above
    ``threshold``)."""
    return normalised_entropy(parent_probs) > threshold


def gated(member_probs: torch.Tensor, parent_probs: torch.Tensor, threshold: float = GATE_THRESHOLD,
          tie: str = "mean") -> torch.Tensor:
    """The parent's argmax, replaced by the members' :func:`vote` where :func:`gate` opens."""
    return torch.where(gate(parent_probs, threshold), vote(member_probs, tie), parent_probs.argmax(-1))


def _log_one_hot(actions: torch.Tensor, count: int, like: torch.Tensor) -> torch.Tensor:
    """log of a distribution certain of ``actions``: 0 there, -inf elsewhere."""
    chosen = nn.functional.one_hot(actions, count).bool()
    return torch.zeros_like(like).masked_fill(~chosen, -math.inf)


class EnsemblePolicy(nn.Module):
    """Members (and, for ``gated``, the parent) acting as one policy under ``rule``."""

    def __init__(self, members: Sequence[nn.Module], rule: str = "mean", parent: nn.Module | None = None,
                 threshold: float = GATE_THRESHOLD, tie: str = "mean"):
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        if rule == "gated" and parent is None:
            raise ValueError("the gated rule needs the parent: it acts unless it is unsure")
        if tie not in TIES:
            raise ValueError(f"tie must be one of {TIES}, got {tie!r}")
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.parent = parent
        self.rule, self.threshold, self.tie = rule, threshold, tie
        # Under ``gated``: the observations it has acted on and those where the members were consulted
        # (the gate's opening rate tells whether a gated ensemble differs from its parent at all).
        self.decisions = self.consulted = 0

    def member_probs(self, obs: torch.Tensor) -> torch.Tensor:
        """(M, B, A) softmax probabilities of the members."""
        return torch.softmax(self._member_logits(obs), dim=-1)

    def _member_logits(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(obs) for member in self.members])

    def _gate(self, parent_logits: torch.Tensor) -> torch.Tensor:
        unsure = gate(torch.softmax(parent_logits, dim=-1), self.threshold)
        self.decisions += len(unsure)
        self.consulted += int(unsure.sum())
        return unsure

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """(B, A) log-probabilities of the ensemble's action distribution (its argmax: the rule's action)."""
        probs = self.member_probs(obs)
        actions = probs.shape[-1]
        if self.rule == "mean":
            return torch.log(probs.mean(0))
        if self.rule == "vote":
            return _log_one_hot(vote(probs, self.tie), actions, probs[0])
        parent = torch.log_softmax(self.parent(obs), dim=-1)
        voted = _log_one_hot(vote(probs, self.tie), actions, parent)
        return torch.where(self._gate(parent)[:, None], voted, parent)

    def sample_actions(self, obs: torch.Tensor, uniforms: np.ndarray) -> np.ndarray:
        """(B,) actions drawn with one uniform per observation: ``mean`` draws from the mean distribution;
        under ``vote`` every member draws with the observation's uniform (coupled draws: identical members
        draw the same action) and the majority acts; ``gated`` draws from the parent, or takes the members'
        vote of their draws where the gate opens."""
        logits = self._member_logits(obs)
        if self.rule == "mean":
            return inverse_cdf(torch.log(torch.softmax(logits, dim=-1).mean(0)), uniforms)
        probs = torch.softmax(logits, dim=-1)
        voted = vote(probs, self.tie, torch.as_tensor(inverse_cdf(logits, uniforms), device=probs.device)).cpu().numpy()
        if self.rule == "vote":
            return voted
        parent = self.parent(obs)
        return np.where(self._gate(parent).cpu().numpy(), voted, inverse_cdf(parent, uniforms))
