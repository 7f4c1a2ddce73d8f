"""Racing: candidates that provably cannot rank are stopped early; elites, members and metrics are the
same as without racing."""

from __future__ import annotations

import math

import pytest

from evo_subens.core.worker import RacingBound
from evo_subens.core.runner import run

from conftest import tiny_dict

# Strong dense-ish noise breaks many children; small batches give the bound several chances per candidate.
# Sigma stays at 3 in every generation and the whole validation split is scored, so later generations keep
# breaking children the bound can stop.
RACY = {"children": {"sigma": 3.0, "density": 0.5},
        "search": {"generations": 3, "eval_batch_size": 40, "fitness": "nll", "step_size": "constant"},
        "ensemble": {"holdout": 0.0}}


def test_bound_by_hand():
    accuracy = RacingBound("accuracy", 0.8)
    # 100 samples, 50 seen: at most (20 + 50) / 100 = 0.7 < 0.8 -> hopeless; (31 + 50) / 100 = 0.81 is not.
    assert accuracy.hopeless(correct=20, loss_sum=0.0, seen=50, total=100)
    assert not accuracy.hopeless(correct=31, loss_sum=0.0, seen=50, total=100)
    assert not accuracy.hopeless(correct=30, loss_sum=0.0, seen=50, total=100)  # exactly 0.8 may still tie
    nll = RacingBound("nll", 0.5)
    assert nll.hopeless(correct=0, loss_sum=51.0, seen=10, total=100)  # NLL >= 0.51 whatever comes next
    assert not nll.hopeless(correct=0, loss_sum=50.0, seen=10, total=100)


def _run(folder, name: str, racing: bool, executor: str):
    extra = dict(RACY, name=name, workers={"executor": executor, "num_actors": 2})
    extra["search"] = dict(RACY["search"], racing=racing)
    return run(tiny_dict(folder, extra), progress=lambda line: None)


@pytest.fixture(scope="module")
def plain_and_raced(tmp_path_factory):
    folder = tmp_path_factory.mktemp("racing")
    return _run(folder, "plain", False, "local"), _run(folder, "raced", True, "local")


@pytest.mark.slow
def test_racing_keeps_elites_members_and_metrics(plain_and_raced):
    plain, raced = plain_and_raced
    stopped = raced.population[raced.population.raced]
    assert len(stopped) > 0 and not plain.population.raced.any()
    assert stopped.val_nll.isna().all() and stopped.val_accuracy.isna().all()
    assert (stopped.generation > 0).all()  # generation 0 has nothing to race against yet
    assert raced.member_genomes == plain.member_genomes
    assert raced.metrics["ensemble"] == plain.metrics["ensemble"]
    assert raced.population.is_elite.tolist() == plain.population.is_elite.tolist()
    scored = raced.population[~raced.population.raced].set_index("candidate")
    reference = plain.population.set_index("candidate").loc[scored.index]
    assert scored.val_nll.tolist() == reference.val_nll.tolist()


@pytest.mark.slow
def test_stopped_candidates_really_could_not_rank(plain_and_raced):
    plain, raced = plain_and_raced
    full = plain.population.set_index("candidate")
    elites = 3  # TINY: search.elites 3, ensemble.size 3 -> racing protects the best 3
    for _, row in raced.population[raced.population.raced].iterrows():
        earlier = full[full.generation < row.generation].val_nll.nsmallest(elites)
        assert full.loc[row.candidate].val_nll > earlier.iloc[-1]
        assert not math.isnan(full.loc[row.candidate].val_nll)


@pytest.mark.ray
@pytest.mark.slow
def test_actors_race_like_the_local_executor(plain_and_raced, ray_session, tmp_path):
    _, local = plain_and_raced
    remote = _run(tmp_path, "raced-ray", True, "ray")
    assert remote.population.raced.tolist() == local.population.raced.tolist()
    assert remote.member_genomes == local.member_genomes
