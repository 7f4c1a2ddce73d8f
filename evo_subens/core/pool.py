"""The ensemble pool of tuned scoring: every tuned candidate and the parent, and the ensemble chosen from them.

Under ``search.scoring: tuned`` each candidate is fine-tuned before it is scored, so its outputs on the
selection split are those of a would-be member. The pool keeps those outputs (probabilities, never
weights: they stay with the workers until members are stored) and after every generation chooses the
ensemble of ``size`` by greedy forward selection without replacement (see :meth:`EnsemblePool.choose`).
The trained parent is in the pool from the start, and the chosen ensemble's selection-split loss is never
above the parent's: when no candidate helps, the ensemble is the parent alone.

A candidate's fitness is ensemble-aware: the loss of the ensemble chosen so far with the candidate
added. Scoring a candidate by its own loss rewards the children the perturbation hurt least, which are
the least diverse once tuned.

    >>> pool = EnsemblePool(size=8, loss=lambda probs: task_nll(probs))
    >>> pool.add([ROOT_CANDIDATE], [parent_outputs])
    >>> fitness = pool.add(new_ids, new_outputs)   # ensemble-aware, one per candidate
    >>> pool.choose()                               # the ensemble's candidate ids, in pick order
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

Loss = Callable[[torch.Tensor], float]  # loss of averaged probabilities on the selection split


class EnsemblePool:
    """Selection-split outputs of the pooled candidates (by candidate id) and the ensemble chosen from
    them. ``holdout`` outputs, where the task has held-back data, only ever measure a choice."""

    def __init__(self, size: int, loss: Loss, parent: int = -1):
        self.size = size
        self.loss = loss
        self.parent = parent  # the trained parent's id: the ensemble's loss is never above its own
        self.outputs: dict[int, torch.Tensor] = {}
        self.holdout: dict[int, torch.Tensor] = {}
        self.members: list[int] = []

    def ensemble_loss(self, members: Sequence[int]) -> float:
        """Loss of the mean of ``members``' outputs (inf for no member)."""
        if not members:
            return math.inf
        return self.loss(_stacked(self.outputs, members).mean(dim=0))

    def add(self, ids: Sequence[int], outputs: Sequence[torch.Tensor],
            holdout: Sequence[torch.Tensor | None] | None = None) -> list[float]:
        """Pool candidates ``ids``; returns each one's ensemble-aware fitness: the loss of the current
        ensemble with it added (its own loss while the ensemble is empty)."""
        fitness = []
        total = _stacked(self.outputs, self.members).sum(dim=0) if self.members else None
        for i, (candidate, probs) in enumerate(zip(ids, outputs)):
            self.outputs[candidate] = probs.float()
            if holdout is not None and holdout[i] is not None:
                self.holdout[candidate] = holdout[i].float()
            joined = probs.double() if total is None else total + probs.double()
            fitness.append(self.loss(joined / (len(self.members) + 1)))
        return fitness

    def choose(self) -> list[int]:
        """The ensemble, by greedy forward selection over the pool without replacement: from the best
        single candidate, add the one that gives the lowest loss (ties: the lower id) until ``size`` members,
        even where an addition raises the selection loss a little (stopping at the first rise overfits the
        selection split: on three MNIST-1D pools the full ensemble had the lower held-back NLL every time,
        0.0982 / 0.1081 / 0.1046 against 0.0988 / 0.1096 / 0.1126). Greedy depends on where it starts, so
        the members chosen before compete too, as they are and grown; the lowest loss wins (ties: the
        earlier of those). When that is still above the parent's loss (the pool's ``parent`` id), the greedy
        path that stops at its first rise is taken: it starts from the best single model, so its loss is at
        most the parent's. Sets and returns :attr:`members`."""
        previous = [m for m in self.members if m in self.outputs]
        options = [previous, self._greedy(previous), self._greedy([])] if previous else [self._greedy([])]
        chosen = min(options, key=self.ensemble_loss)
        if self.parent in self.outputs and self.ensemble_loss(chosen) > self.ensemble_loss([self.parent]):
            chosen = self._greedy([], stop_at_rise=True)
        self.members = chosen
        return chosen

    def _greedy(self, start: list[int], stop_at_rise: bool = False) -> list[int]:
        ids = sorted(self.outputs)
        members = list(start)
        total = _stacked(self.outputs, members).sum(dim=0) if members else None
        current = self.ensemble_loss(members)
        while len(members) < self.size:
            best, best_loss = None, math.inf
            for candidate in ids:
                if candidate in members:
                    continue
                probs = self.outputs[candidate].double()
                trial = self.loss((probs if total is None else total + probs) / (len(members) + 1))
                if trial < best_loss:
                    best, best_loss = candidate, trial
            if best is None or (stop_at_rise and best_loss >= current):
                break
            members.append(best)
            total = self.outputs[best].double() if total is None else total + self.outputs[best].double()
            current = best_loss
        return members

    def holdout_probs(self, members: Sequence[int]) -> torch.Tensor | None:
        """Mean held-back outputs of ``members`` (None without held-back data)."""
        if not members or any(m not in self.holdout for m in members):
            return None
        return _stacked(self.holdout, members).mean(dim=0)

    def state_dict(self) -> dict:
        """Plain data for a checkpoint (tensors load with ``weights_only=True``)."""
        return {"outputs": {str(k): v for k, v in self.outputs.items()},
                "holdout": {str(k): v for k, v in self.holdout.items()}, "members": list(self.members)}

    def load_state_dict(self, state: dict) -> None:
        self.outputs = {int(k): v for k, v in state["outputs"].items()}
        self.holdout = {int(k): v for k, v in state["holdout"].items()}
        self.members = list(state["members"])


def _stacked(outputs: dict[int, torch.Tensor], members: Sequence[int]) -> torch.Tensor:
    """``members``' outputs stacked along a new first dimension, in float64."""
    return torch.stack([outputs[m].double() for m in members])
