"""The search ranks, logs and checkpoints whatever validation metrics a task declares: a worker payload
with a 'return' metric (higher is better) and a 'length' tie-break runs through the same problem and
search as classification, with val_return / val_length columns."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from evo_subens.core.config import ChildrenConfig, SearchConfig
from evo_subens.core.problem import SubnetworkProblem
from evo_subens.core.rundir import population_frame
from evo_subens.core.search import CandidateRecord, Ranking, SubnetworkSearch, select_members
from evo_subens.core.worker import CandidateScore, Evaluator, WorkerPayload, parent_fingerprint
from evo_subens.families import make_family
from evo_subens.tasks.base import Metric

METRICS = (Metric("return", higher_is_better=True), Metric("length", higher_is_better=False))


class ScoreByWeights(Evaluator):
    """'return' = sum of the child's weights (a deterministic function of the genome); 'length' = 1."""

    def __init__(self, payload: "ReturnPayload"):
        self.device = torch.device("cpu")
        self.model = nn.Linear(3, 2)
        self.model.load_state_dict(payload.parent_state)
        self.family = make_family(payload.children)
        self.materialiser = self.family.bind(self.model)

    def evaluate_many(self, genomes: list[str]) -> list[CandidateScore]:
        scores = []
        for genome in genomes:
            started = time.perf_counter()
            with torch.no_grad(), self.materialiser.materialised(genome):
                total = float(sum(p.sum() for p in self.model.parameters()))
            scores.append(CandidateScore((total, 1.0), time.perf_counter() - started))
        return scores

    def child_state(self, genome: str) -> dict:
        with self.materialiser.materialised(genome):
            return {k: v.clone() for k, v in self.model.state_dict().items()}

    def finetuned_state(self, genome, seed, start=None):
        raise NotImplementedError


@dataclass
class ReturnPayload(WorkerPayload):
    parent_state: dict
    parent_id: str
    children: ChildrenConfig
    threads: int = 1
    use_gpu: bool = False
    stack_candidates: int = 1
    metrics = METRICS

    def make_evaluator(self, device="cpu") -> Evaluator:
        return ScoreByWeights(self)


def test_a_task_declared_metric_ranks_logs_and_checkpoints() -> None:
    torch.manual_seed(0)
    state = nn.Linear(3, 2).state_dict()
    children = ChildrenConfig(density=1.0, sigma=0.5, sigma_mode="absolute", include_classifier=True)
    payload = ReturnPayload(state, parent_fingerprint(state), children)
    problem = SubnetworkProblem(payload, fitness="return")
    assert problem.objective_sense == "max"
    search = SubnetworkSearch(problem, make_family(children), SearchConfig(population=6, generations=2, elites=2,
                                                                           fitness="return"), seed=0)
    search.run(2)
    records = search.records
    assert set(records[0].metrics) == {"return", "length"}
    returns = [r.metrics["return"] for r in records]
    assert search.elites[0].metrics["return"] == max(returns)  # higher is better
    assert all(r.fitness == r.metrics["return"] for r in records)
    best = select_members(records, 3, search.ranking)
    assert [r.metrics["return"] for r in best] == sorted(returns, reverse=True)[:3]
    assert search.status["best_return"] == max(returns)
    # The log's columns follow the metrics; a checkpoint's rows give back the same records.
    family = make_family(children)
    rows = [dict(r.as_row(), **family.describe(r.genome), is_member=False, worker="local") for r in records]
    frame = population_frame(rows, family.log_columns, ["return", "length"])
    assert list(frame.columns[frame.columns.get_loc("fitness"):][:3]) == ["fitness", "val_return", "val_length"]
    assert [CandidateRecord.from_row(r.as_row()) for r in records] == records


def test_ranking_ties_and_nan() -> None:
    def record(candidate: int, ret: float, length: float) -> CandidateRecord:
        return CandidateRecord(0, candidate, -1, f"g{candidate}", ret, {"return": ret, "length": length}, 0.0, -1)

    ranking = Ranking(METRICS, "return")
    records = [record(0, 5.0, 10.0), record(1, 5.0, 3.0), record(2, math.nan, math.nan), record(3, 7.0, 50.0)]
    assert [r.candidate for r in sorted(records, key=ranking.key)] == [3, 1, 0, 2]
    assert ranking.better(records[1], records[0]) and not ranking.better(records[0], records[1])
    by_length = Ranking(METRICS, "length")
    assert [r.candidate for r in sorted(records, key=by_length.key)] == [1, 0, 3, 2]


def test_a_measurement_metric_is_logged_but_never_ranks() -> None:
    measured = (Metric("return", higher_is_better=True), Metric("env_steps", higher_is_better=False, ranks=False))

    def record(candidate: int, ret: float, steps: float) -> CandidateRecord:
        return CandidateRecord(0, candidate, -1, f"g{candidate}", ret, {"return": ret, "env_steps": steps}, 0.0, -1)

    ranking = Ranking(measured, "return")
    records = [record(0, 5.0, 900.0), record(1, 5.0, 10.0)]
    # Equal returns: the candidate id decides, not the steps the episodes happened to take.
    assert [r.candidate for r in sorted(records, key=ranking.key)] == [0, 1]
    assert not ranking.better(records[1], records[0])
    with pytest.raises(ValueError, match="ranking metrics"):
        Ranking(measured, "env_steps")


def test_search_fitness_must_be_a_ranking_metric() -> None:
    from evo_subens.core.config import config_from_dict
    from evo_subens.errors import ConfigError

    with pytest.raises(ConfigError, match="search.fitness"):
        config_from_dict({"task": "rl", "search": {"fitness": "env_steps"}})
