"""Ensemble-level decisions on validation probabilities: greedy forward selection and acceptance."""

from __future__ import annotations

import math

import torch

from .metrics import nll


def greedy_selection(pool_probs: list[torch.Tensor], labels: torch.Tensor, size: int) -> list[int]:
    """Forward selection with replacement (Caruana et al., 2004): ``size`` times, add the pool member
    whose addition gives the lowest NLL of the averaged probabilities (ties: the lower index).

    ``pool_probs`` are validation probabilities; returns indices into the pool, in pick order.
    """
    picks: list[int] = []
    total = torch.zeros_like(pool_probs[0], dtype=torch.float64)
    for _ in range(size):
        scores = [nll((total + p.double()) / (len(picks) + 1), labels) for p in pool_probs]
        best = min(range(len(pool_probs)), key=lambda j: (scores[j], j))
        picks.append(best)
        total += pool_probs[best].double()
    return picks


def accept_members(kept_probs: list[torch.Tensor], new_probs: list[torch.Tensor], labels: torch.Tensor, *,
                   enabled: bool = True) -> list[int]:
    """Ensemble-level acceptance: which of ``new_probs`` join an ensemble that already holds ``kept_probs``.

    Candidates are tried in the order given (the selection order, i.e. by search fitness); one joins only
    if the averaged ensemble's validation NLL is strictly lower with it than without it, so no accepted
    member makes the validation ensemble worse. The first member of an empty ensemble always joins.
    ``enabled=False`` accepts every candidate. Returns indices into ``new_probs`` in the order they joined.

    Trying candidates in the order of their own validation NLL instead conditions twice on the same noisy
    split: on MNIST-1D (800 selection samples) it kept the 2 luckiest of 8 fine-tuned members and raised
    the test NLL from 0.109 (all 8) to 0.113.
    """
    total = torch.stack([p.double() for p in kept_probs]).sum(dim=0) if kept_probs else None
    count = len(kept_probs)
    current = nll(total / count, labels) if count else math.inf
    accepted = []
    for j, probs in enumerate(new_probs):
        candidate = probs.double() if total is None else total + probs.double()
        trial = nll(candidate / (count + 1), labels)
        if not enabled or count == 0 or trial < current:
            accepted.append(j)
            total, count, current = candidate, count + 1, trial
    return accepted
