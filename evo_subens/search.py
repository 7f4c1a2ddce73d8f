"""The gradient-free population loop, as an EvoTorch ``SearchAlgorithm`` over genomes.

Each step proposes ``population`` children of the current parents (generation 0: the trained parent;
later: the elites, so mutations compound), evaluates them through the problem (Ray actors or
in-process), records one :class:`CandidateRecord` per candidate and keeps the ``elites`` best seen so
far. Elites are not evaluated again: fitness is deterministic.

    >>> search = SubnetworkSearch(problem, family, cfg.search, seed=0)
    >>> search.run(cfg.search.generations)
    >>> members = select_members(search.records, cfg.ensemble.size, cfg.search.fitness)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from evotorch.algorithms.searchalgorithm import SearchAlgorithm

from .config import SearchConfig
from .families import Family
from .problem import SubnetworkProblem


@dataclass
class CandidateRecord:
    """One evaluated candidate: a row of the population log."""

    generation: int
    candidate: int
    parent: int
    genome: str
    fitness: float
    val_accuracy: float
    val_nll: float
    eval_seconds: float
    worker: int
    is_elite: bool = False
    is_member: bool = False

    def as_row(self) -> dict:
        """The record as a flat dict."""
        return dataclasses.asdict(self)


ROOT_CANDIDATE = -1  # the ``parent`` of generation-0 candidates: the trained parent itself


def rank_key(record: CandidateRecord, fitness: str) -> tuple:
    """Sort key, best first: the fitness metric, the other metric as tie-break, then the candidate id.

    A diverged candidate (NaN metrics) ranks last: NaN compares false with everything and would
    otherwise land anywhere in a sort.
    """
    nll = math.inf if math.isnan(record.val_nll) else record.val_nll
    accuracy = -math.inf if math.isnan(record.val_accuracy) else record.val_accuracy
    if fitness == "accuracy":
        return (-accuracy, nll, record.candidate)
    return (nll, -accuracy, record.candidate)


def select_members(records: list[CandidateRecord], size: int, fitness: str) -> list[CandidateRecord]:
    """The ``size`` best candidates with distinct genomes, best first."""
    members: list[CandidateRecord] = []
    seen: set[str] = set()
    for record in sorted(records, key=lambda r: rank_key(r, fitness)):
        if record.genome not in seen:
            seen.add(record.genome)
            members.append(record)
        if len(members) == size:
            break
    return members


class SubnetworkSearch(SearchAlgorithm):
    """Generations of genome candidates with elitism (``mu + lambda`` truncation selection)."""

    def __init__(self, problem: SubnetworkProblem, family: Family, cfg: SearchConfig, *, seed: int):
        super().__init__(problem, best_fitness=self._best_fitness, best_accuracy=self._best_accuracy,
                         best_nll=self._best_nll, generation=lambda: self.generation)
        self.family = family
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)
        self.root = family.root(problem.payload.parent_id)
        self.records: list[CandidateRecord] = []
        self.elites: list[CandidateRecord] = []
        self.generation = 0

    def _best(self) -> CandidateRecord:
        return self.elites[0]

    def _best_fitness(self) -> float:
        return self._best().fitness

    def _best_accuracy(self) -> float:
        return self._best().val_accuracy

    def _best_nll(self) -> float:
        return self._best().val_nll

    def _step(self) -> None:
        parents = self.elites or None
        parent_genomes = [e.genome for e in parents] if parents else [self.root]
        proposals = self.family.propose(parent_genomes, self.cfg.population, self.rng)
        batch = self.problem.make_batch([genome for _, genome in proposals])
        self.problem.evaluate(batch)
        evals = batch.evals.cpu().numpy()
        first_id = len(self.records)
        new = []
        for i, ((parent_index, genome), row) in enumerate(zip(proposals, evals)):
            fitness, accuracy, nll, seconds, worker = (float(v) for v in row)
            parent_id = parents[parent_index].candidate if parents else ROOT_CANDIDATE
            new.append(CandidateRecord(self.generation, first_id + i, parent_id, genome, fitness, accuracy, nll,
                                       seconds, int(worker)))
        self.records.extend(new)
        self.elites = sorted(self.elites + new, key=lambda r: rank_key(r, self.cfg.fitness))[: self.cfg.elites]
        for record in self.elites:
            if record.generation == self.generation:
                record.is_elite = True
        self.generation += 1
