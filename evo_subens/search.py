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
import torch
from evotorch.algorithms.searchalgorithm import SearchAlgorithm

from .config import SearchConfig
from .families import Family
from .evaluation import RacingBound
from .metrics import nll
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
    node: str = ""  # Ray node id of the worker ('local' in-process; '' in checkpoints written before it)
    raced: bool = False  # scoring stopped by the racing bound: metrics are NaN
    diverged: bool = False  # NaN or infinite validation metrics (logged as NaN): never an elite or member

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


def select_members(records: list[CandidateRecord], size: int, fitness: str,
                   keep: list[CandidateRecord] = ()) -> list[CandidateRecord]:
    """The ``size`` best candidates with distinct genomes, best first, after the members in ``keep``
    (growing an ensemble keeps its members and adds the best of the rest)."""
    members: list[CandidateRecord] = list(keep)
    seen: set[str] = {m.genome for m in keep}
    for record in sorted(records, key=lambda r: rank_key(r, fitness)):
        if len(members) >= size:
            break
        if record.genome not in seen and not record.diverged:
            seen.add(record.genome)
            members.append(record)
    return members


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


class SubnetworkSearch(SearchAlgorithm):
    """Generations of genome candidates with elitism (``mu + lambda`` truncation selection)."""

    def __init__(self, problem: SubnetworkProblem, family: Family, cfg: SearchConfig, *, seed: int,
                 racing_rank: int = 0):
        super().__init__(problem, best_fitness=self._best_fitness, best_accuracy=self._best_accuracy,
                         best_nll=self._best_nll, generation=lambda: self.generation)
        self.family = family
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)
        self.root = family.root(problem.payload.parent_id)
        self.records: list[CandidateRecord] = []
        self.elites: list[CandidateRecord] = []
        self.generation = 0
        self.worker_pids: dict[int, int] = {}  # per process: a resumed run starts new actors
        self.incidents: list[dict] = []
        # Racing stops candidates that cannot enter the best ``racing_rank`` so far (0: off); the runner
        # passes the number of candidates elites and ensemble selection draw from.
        self.racing_rank = racing_rank

    def racing_bound(self) -> RacingBound | None:
        """The bound of the next generation: the fitness of the ``racing_rank``-th best candidate so far
        (None until that many candidates have valid metrics)."""
        ranked = sorted(self.records, key=lambda r: rank_key(r, self.cfg.fitness))
        if len(ranked) < self.racing_rank or math.isnan(ranked[self.racing_rank - 1].fitness):
            return None
        return RacingBound(self.cfg.fitness, ranked[self.racing_rank - 1].fitness)

    def state_dict(self) -> dict:
        """The search state as plain data (for checkpoints); :meth:`load_state_dict` restores it."""
        return {"generation": self.generation, "records": [r.as_row() for r in self.records],
                "elites": [r.candidate for r in self.elites], "rng": self.rng.bit_generator.state,
                "incidents": list(self.incidents)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict`: the next step proposes exactly what it would have."""
        self.generation = state["generation"]
        self.records = [CandidateRecord(**row) for row in state["records"]]
        self.elites = [self.records[i] for i in state["elites"]]
        self.rng.bit_generator.state = state["rng"]
        self.incidents = list(state["incidents"])

    def _note_restarts(self, rows: list[tuple[int, int]]) -> None:
        """Record a lost worker when an actor index reports a new process id (Ray restarted it)."""
        for worker, pid in rows:
            previous = self.worker_pids.get(worker)
            if previous is not None and previous != pid:
                self.incidents.append({"generation": self.generation, "worker": worker, "lost_pid": previous,
                                       "new_pid": pid})
            self.worker_pids[worker] = pid

    def _best_fitness(self) -> float:
        return self.elites[0].fitness if self.elites else math.nan  # no elite yet: every child diverged

    def _best_accuracy(self) -> float:
        return self.elites[0].val_accuracy if self.elites else math.nan

    def _best_nll(self) -> float:
        return self.elites[0].val_nll if self.elites else math.nan

    def _step(self) -> None:
        parents = self.elites or None
        parent_genomes = [e.genome for e in parents] if parents else [self.root]
        proposals = self.family.propose(parent_genomes, self.cfg.population, self.rng)
        batch = self.problem.make_batch([genome for _, genome in proposals])
        if self.racing_rank:
            self.problem.set_racing_bound(self.racing_bound())
        self.problem.evaluate(batch)
        evals = batch.evals.cpu().numpy()
        first_id = len(self.records)
        new = []
        pids = []
        for i, ((parent_index, genome), row) in enumerate(zip(proposals, evals)):
            fitness, accuracy, nll, seconds, worker, pid, raced, diverged = (float(v) for v in row)
            parent_id = parents[parent_index].candidate if parents and parent_index >= 0 else ROOT_CANDIDATE
            new.append(CandidateRecord(self.generation, first_id + i, parent_id, genome, fitness, accuracy, nll,
                                       seconds, int(worker), node=self.problem.worker_node(int(worker), int(pid)),
                                       raced=bool(raced), diverged=bool(diverged)))
            pids.append((int(worker), int(pid)))
        self._note_restarts(pids)
        self.records.extend(new)
        kept = [r for r in new if not r.diverged]
        self.elites = sorted(self.elites + kept, key=lambda r: rank_key(r, self.cfg.fitness))[: self.cfg.elites]
        for record in self.elites:
            if record.generation == self.generation:
                record.is_elite = True
        self.generation += 1
