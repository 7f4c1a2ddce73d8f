"""The gradient-free population loop, as an EvoTorch ``SearchAlgorithm`` over genomes.

Each step proposes ``population`` children of the current parents (generation 0: the trained parent;
later: the elites, so mutations compound), evaluates them through the problem (Ray actors or
in-process), records one :class:`CandidateRecord` per candidate and keeps the ``elites`` best seen so
far. Elites are not evaluated again: fitness is deterministic.

    >>> search = SubnetworkSearch(problem, family, cfg.search, seed=0)
    >>> search.run(cfg.search.generations)
    >>> members = select_members(search.records, cfg.ensemble.size, search.ranking)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from evotorch.algorithms.searchalgorithm import SearchAlgorithm

from .config import SearchConfig
from ..families import Family
from ..tasks.base import Metric
from .pool import EnsemblePool
from .worker import RacingBound
from .problem import SubnetworkProblem

# Tuned scoring: a candidate's outputs on the selection split and on held-back data (None: none held back).
PoolOutputs = Callable[[list["CandidateRecord"]], tuple[list[torch.Tensor], list["torch.Tensor | None"]]]


@dataclass
class CandidateRecord:
    """One evaluated candidate: a row of the population log. ``metrics``: the task's validation metrics by
    name, logged as ``val_<name>`` columns."""

    generation: int
    candidate: int
    parent: int
    genome: str
    fitness: float
    metrics: dict[str, float]
    eval_seconds: float
    worker: int
    is_elite: bool = False
    node: str = ""  # Ray node id of the worker ('local' in-process; '' in checkpoints written before it)
    host: str = ""  # IP address of that node ('local' in-process; '' in checkpoints written before it)
    finished_at: float = math.nan  # wall-clock time its evaluation ended, in seconds since the Unix epoch
    raced: bool = False  # scoring stopped by the racing bound: metrics are NaN
    diverged: bool = False  # NaN or infinite validation metrics (logged as NaN): never an elite or member
    step_scale: float = 1.0  # the multiple of the configured perturbation strength it was made with
    ensemble_nll: float = math.nan  # tuned scoring: selection NLL of the ensemble so far with it added

    def metric_row(self) -> dict[str, float]:
        """The metrics as the log's ``val_<name>`` columns, in the task's order."""
        return {f"val_{name}": value for name, value in self.metrics.items()}

    def as_row(self) -> dict:
        """The record as a flat dict (the metrics as ``val_<name>`` entries, after the fitness)."""
        row = {}
        for f in dataclasses.fields(self):
            if f.name == "metrics":
                row.update(self.metric_row())
            else:
                row[f.name] = getattr(self, f.name)
        return row

    @classmethod
    def from_row(cls, row: dict) -> CandidateRecord:
        """The record an :meth:`as_row` dict (e.g. a checkpoint's) describes."""
        metrics = {key[len("val_"):]: value for key, value in row.items() if key.startswith("val_")}
        rest = {key: value for key, value in row.items() if not key.startswith("val_")}
        return cls(metrics=metrics, **rest)


ROOT_CANDIDATE = -1  # the ``parent`` of generation-0 candidates: the trained parent itself
REFERENCE_GENERATION = -1  # the generation of the parent's reference row in the population log


@dataclass(frozen=True)
class Ranking:
    """The order of candidates, best first: the fitness metric, then the task's other metrics in the order
    it declares them (tie-breaks), then the candidate id.

    A diverged candidate (NaN metrics) ranks last: NaN compares false with everything and would otherwise
    land anywhere in a sort.
    """

    metrics: tuple[Metric, ...]
    fitness: str

    def __post_init__(self) -> None:
        criteria = [m for m in self.metrics if m.ranks]
        names = [m.name for m in criteria]
        if self.fitness not in names:
            raise ValueError(f"fitness {self.fitness!r} is not one of the task's ranking metrics {names}")
        ordered = [m for m in criteria if m.name == self.fitness] + [m for m in criteria if m.name != self.fitness]
        object.__setattr__(self, "ordered", tuple(ordered))

    @property
    def fitness_metric(self) -> Metric:
        return self.ordered[0]

    def key(self, record: CandidateRecord) -> tuple:
        """Sort key of ``record``, best first."""
        parts = []
        for metric in self.ordered:
            value = record.metrics[metric.name]
            parts.append(math.inf if math.isnan(value) else (-value if metric.higher_is_better else value))
        return (*parts, record.candidate)

    def better(self, record: CandidateRecord, than: CandidateRecord | None) -> bool:
        """Whether ``record`` ranks strictly above ``than`` on its metrics (anything beats nothing)."""
        if than is None:
            return True
        return self.key(record)[:-1] < self.key(than)[:-1]


def select_members(records: list[CandidateRecord], size: int, ranking: Ranking,
                   keep: list[CandidateRecord] = ()) -> list[CandidateRecord]:
    """The ``size`` best candidates with distinct genomes, best first, after the members in ``keep``
    (growing an ensemble keeps its members and adds the best of the rest)."""
    members: list[CandidateRecord] = list(keep)
    seen: set[str] = {m.genome for m in keep}
    for record in sorted(records, key=ranking.key):
        if len(members) >= size:
            break
        if record.genome not in seen and not record.diverged:
            seen.add(record.genome)
            members.append(record)
    return members


class SubnetworkSearch(SearchAlgorithm):
    """Generations of genome candidates with elitism (``mu + lambda`` truncation selection)."""

    def __init__(self, problem: SubnetworkProblem, family: Family, cfg: SearchConfig, *, seed: int,
                 racing_rank: int = 0, reference: CandidateRecord | None = None,
                 pool: EnsemblePool | None = None, pool_outputs: PoolOutputs | None = None):
        # EvoTorch's status: the fitness, each best-candidate metric (best_<name>) and the generation.
        best = {f"best_{m.name}": (lambda name=m.name: self._best_metric(name)) for m in problem.metrics}
        super().__init__(problem, best_fitness=self._best_fitness, **best, generation=lambda: self.generation)
        self.family = family
        self.cfg = cfg
        self.ranking = Ranking(problem.metrics, cfg.fitness)
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
        # The trained parent's own validation record: what generation 0's children must beat to count as
        # successes of the 1/5 rule (None: every child of the root counts as a success).
        self.reference = reference
        self.step_scale = 1.0  # multiplies children.sigma of new mutations (search.step_size)
        self.stalled = 0       # generations in a row without a better best candidate
        self.stopped = False   # search.patience ran out: the loop stops early
        self.history: list[dict] = []  # per generation: step scale used, success rate, improved or not
        # Tuned scoring (search.scoring: tuned): the pool of tuned candidates and how to get their outputs.
        self.pool = pool
        self.pool_outputs = pool_outputs

    def racing_bound(self) -> RacingBound | None:
        """The bound of the next generation: the fitness of the ``racing_rank``-th best candidate so far
        (None until that many candidates have valid metrics)."""
        ranked = sorted(self.records, key=self.ranking.key)
        if len(ranked) < self.racing_rank or math.isnan(ranked[self.racing_rank - 1].fitness):
            return None
        return RacingBound(self.cfg.fitness, ranked[self.racing_rank - 1].fitness)

    def state_dict(self) -> dict:
        """The search state as plain data (for checkpoints); :meth:`load_state_dict` restores it."""
        return {"generation": self.generation, "records": [r.as_row() for r in self.records],
                "elites": [r.candidate for r in self.elites], "rng": self.rng.bit_generator.state,
                "incidents": list(self.incidents), "step_scale": self.step_scale, "stalled": self.stalled,
                "stopped": self.stopped, "history": list(self.history),
                "pool": self.pool.state_dict() if self.pool is not None else None}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict`: the next step proposes exactly what it would have."""
        self.generation = state["generation"]
        self.records = [CandidateRecord.from_row(row) for row in state["records"]]
        self.elites = [self.records[i] for i in state["elites"]]
        self.rng.bit_generator.state = state["rng"]
        self.incidents = list(state["incidents"])
        # Checkpoints written before step-size adaptation and early stopping carry none of their state.
        self.step_scale = state.get("step_scale", 1.0)
        self.stalled = state.get("stalled", 0)
        self.stopped = state.get("stopped", False)
        self.history = list(state.get("history", []))
        if self.pool is not None and state.get("pool") is not None:
            self.pool.load_state_dict(state["pool"])

    def _note_restarts(self, rows: list[tuple[int, int, int]]) -> None:
        """Record a lost worker when an actor index reports a new process id (Ray restarted it), with the
        candidates its new process evaluated in this generation (the lost one's unfinished ones among them)."""
        for worker, pid, _ in rows:
            previous = self.worker_pids.get(worker)
            if previous is not None and previous != pid:
                redone = [c for w, p, c in rows if w == worker and p == pid]
                self.incidents.append({"generation": self.generation, "worker": worker, "lost_pid": previous,
                                       "new_pid": pid, "candidates": redone})
            self.worker_pids[worker] = pid

    def _best_fitness(self) -> float:
        return self.elites[0].fitness if self.elites else math.nan  # no elite yet: every child diverged

    def _best_metric(self, name: str) -> float:
        return self.elites[0].metrics[name] if self.elites else math.nan

    def _step(self) -> None:
        if self.pool is not None:
            self._tuned_step()
            return
        parents = self.elites or None
        parent_genomes = [e.genome for e in parents] if parents else [self.root]
        proposals = self.family.propose(parent_genomes, self.cfg.population, self.rng, step_scale=self.step_scale)
        if self.racing_rank:
            self.problem.set_racing_bound(self.racing_bound())
        new = self._evaluate(proposals, parents, [self.step_scale] * len(proposals))
        best_before = self.elites[0] if self.elites else None
        kept = [r for r in new if not r.diverged]
        self.elites = sorted(self.elites + kept, key=self.ranking.key)[: self.cfg.elites]
        for record in self.elites:
            if record.generation == self.generation:
                record.is_elite = True
        improved = bool(self.elites) and (best_before is None or self._better(self.elites[0], best_before))
        successes = sum(self._better(child, parents[i] if parents and i >= 0 else self.reference)
                        for (i, _), child in zip(proposals, new))
        self.history.append({"generation": self.generation, "step_scale": self.step_scale,
                             "success_rate": successes / len(new), "improved": improved})
        self._adapt(successes / len(new), improved)
        self.generation += 1

    def _evaluate(self, proposals: list[tuple[int, str]], parents: list[CandidateRecord] | None,
                  scales: list[float]) -> list[CandidateRecord]:
        """Evaluate proposed genomes in the workers; one record each, in proposal order."""
        batch = self.problem.make_batch([genome for _, genome in proposals])
        self.problem.evaluate(batch)
        evals = batch.evals.cpu().numpy()
        first_id = len(self.records)
        new, pids = [], []
        for i, ((parent_index, genome), row, scale) in enumerate(zip(proposals, evals, scales)):
            fitness, metrics, (seconds, worker, pid, raced, diverged, finished) = self.problem.unpack(row)
            parent_id = parents[parent_index].candidate if parents and parent_index >= 0 else ROOT_CANDIDATE
            node, host = self.problem.worker_node(int(worker), int(pid))
            new.append(CandidateRecord(self.generation, first_id + i, parent_id, genome, fitness, metrics,
                                       seconds, int(worker), node=node, host=host, finished_at=finished,
                                       raced=bool(raced), diverged=bool(diverged), step_scale=scale))
            pids.append((int(worker), int(pid), first_id + i))
        self._note_restarts(pids)
        self.records.extend(new)
        return new

    def _tuned_step(self) -> None:
        """A generation of tuned scoring: children of the trained parent, each at its own perturbation
        strength around the adapted centre, fine-tuned and scored in the workers; each one's fitness is the
        ensemble loss with it added, and the ensemble is chosen again from the whole pool.

        Children always extend the trained parent: a mutation of a tuned member would need a second
        fine-tuning cycle, and restarting the learning rate costs the members their diversity. What one
        generation passes to the next is the pool (its tuned members compete with every later candidate,
        with their tuned weights: Lamarckian) and the perturbation strength that made the members.
        """
        count = self.cfg.population
        spread = self.cfg.step_spread
        scales = [float(self.step_scale * math.exp(spread * z)) if spread else self.step_scale
                  for z in self.rng.standard_normal(count)]
        proposals = self.family.propose([self.root], count, self.rng, step_scale=scales)
        new = self._evaluate(proposals, None, scales)
        before = self.pool.ensemble_loss(self.pool.members)
        kept = [r for r in new if not r.diverged]
        if kept:
            selection, holdout = self.pool_outputs(kept)
            for record, value in zip(kept, self.pool.add([r.candidate for r in kept], selection, holdout)):
                record.ensemble_nll = value
        members = self.pool.choose()
        self.elites = [self.records[m] for m in members if m != ROOT_CANDIDATE]  # ids index the records
        for record in self.elites:
            if record.generation == self.generation:
                record.is_elite = True
        after = self.pool.ensemble_loss(members)
        improved = after < before
        joined = sum(r.is_elite for r in new)
        self.history.append({"generation": self.generation, "step_scale": self.step_scale,
                             "success_rate": joined / len(new), "improved": bool(improved)})
        if self.elites:  # the centre moves to the strengths that made the ensemble's members
            self.step_scale = float(math.exp(np.mean([math.log(r.step_scale) for r in self.elites])))
        self._note_progress(improved)
        self.generation += 1

    def _better(self, record: CandidateRecord, than: CandidateRecord | None) -> bool:
        return self.ranking.better(record, than)

    def _adapt(self, success_rate: float, improved: bool) -> None:
        """Step size and early stopping after a generation.

        Compounded mutations at a fixed sigma drift away from the good region generation after generation;
        the 1/5 success rule (Rechenberg) widens steps while more than a fifth of the children beat the
        genome they extend and narrows them otherwise. A search that stops improving its best candidate
        for ``patience`` generations stops instead of spending more evaluations.
        """
        factor = self.cfg.step_factor
        if self.cfg.step_size == "decay":
            self.step_scale *= factor
        elif self.cfg.step_size == "one_fifth":
            self.step_scale *= (1 / factor) if success_rate > 0.2 else factor
        self._note_progress(improved)

    def _note_progress(self, improved: bool) -> None:
        """Count generations without improvement; ``search.patience`` of them stop the search."""
        self.stalled = 0 if improved else self.stalled + 1
        if self.cfg.patience and self.stalled >= self.cfg.patience:
            self.stopped = True
