"""Tuned scoring (search.scoring: tuned): candidates fine-tuned before they are scored, an ensemble-aware
fitness, the greedy ensemble over the parent and every tuned candidate; and the parent guarantees of both
loops: an ensemble never worse than its parent on the selection split, a parent that did not learn stops
the run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

import evo_subens
from evo_subens.core.config import config_from_dict
from evo_subens.core.pool import EnsemblePool
from evo_subens.core.search import ROOT_CANDIDATE
from evo_subens.errors import ConfigError, UserError
from evo_subens.tasks.classification.metrics import nll

from conftest import RUNTIME_COLUMNS, TINY, deep_merge, tiny_dict

TUNED = {"search": {"scoring": "tuned", "population": 4, "generations": 2, "fitness": "nll"},
         "finetune": {"epochs": 1, "lr": 0.05}, "ensemble": {"size": 3}, "parent": {"epochs": 4}}


def _selection_nll(result, states: list[dict]) -> float:
    """The selection-split NLL of the ensemble of ``states``, recomputed from the run's own task."""
    from evo_subens.tasks import make_task

    cfg = config_from_dict(yaml.safe_load((result.run_dir / "config.yaml").read_text()))
    task = make_task(cfg, lambda line: None)
    task.load()
    probs = task.pool_outputs(states)[0]
    return task.pool_loss(torch.stack([p.double() for p in probs]).mean(dim=0))


def _member_states(run_dir: Path) -> list[dict]:
    members = json.loads((run_dir / "members.json").read_text())
    return [torch.load(run_dir / m["weights"], weights_only=True) for m in members]


# --- the pool ----------------------------------------------------------------------------------------

def test_pool_never_chooses_an_ensemble_worse_than_the_parent() -> None:
    """Whatever the candidates, the greedy ensemble's loss is at most the parent's; with only bad
    candidates it is the parent alone."""
    labels = torch.tensor([0, 1, 2, 1, 0, 2])
    loss = lambda probs: nll(probs, labels)  # noqa: E731
    parent = torch.full((6, 3), 0.1).scatter_(1, labels.view(-1, 1), 0.8)
    wrong = torch.full((6, 3), 0.45).scatter_(1, labels.view(-1, 1), 0.1)
    pool = EnsemblePool(4, loss)
    pool.add([ROOT_CANDIDATE], [parent])
    assert pool.choose() == [ROOT_CANDIDATE]
    fitness = pool.add([0, 1], [wrong, wrong.roll(1, dims=1)])
    assert all(f > loss(parent) for f in fitness)
    assert pool.choose() == [ROOT_CANDIDATE]
    generator = torch.Generator().manual_seed(0)
    for round_ in range(5):  # random candidates: never above the parent
        ids = [10 * (round_ + 1) + i for i in range(4)]
        pool.add(ids, [torch.rand(6, 3, generator=generator).softmax(dim=1) for _ in ids])
        members = pool.choose()
        assert pool.ensemble_loss(members) <= loss(parent)
        assert len(members) == len(set(members)) <= 4


def test_pool_choice_never_gets_worse_when_candidates_join() -> None:
    """Greedy selection from scratch can end worse than the ensemble already chosen (a strong single
    candidate that nothing improves); the current members, grown, compete and win."""
    labels = torch.tensor([0, 0, 1, 1])
    loss = lambda probs: nll(probs, labels)  # noqa: E731
    pool = EnsemblePool(4, loss)
    a = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.1, 0.9], [0.1, 0.9]])  # wrong on row 1
    b = torch.tensor([[0.2, 0.8], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])  # wrong on row 0
    pool.add([0, 1], [a, b])
    first = pool.choose()
    assert sorted(first) == [0, 1]
    before = pool.ensemble_loss(first)
    steady = torch.tensor([[0.7, 0.3], [0.7, 0.3], [0.3, 0.7], [0.3, 0.7]])  # the best single model
    pool.add([2], [steady])
    # greedy from scratch that stops at its first rise ends on the single model, worse than before
    assert loss(steady) < loss(a) and pool._greedy([], stop_at_rise=True) == [2] and loss(steady) > before
    chosen = pool.choose()
    assert pool.ensemble_loss(chosen) < before and sorted(chosen) == [0, 1, 2]


def test_pool_fills_the_ensemble_unless_that_is_worse_than_the_parent() -> None:
    """Greedy selection goes on to ``size`` members past a small rise of the selection loss; it stops at
    the first rise only where the full ensemble would be worse than the parent."""
    labels = torch.tensor([0, 1, 0, 1])
    loss = lambda probs: nll(probs, labels)  # noqa: E731
    pool = EnsemblePool(3, loss)
    parent = torch.tensor([[0.6, 0.4], [0.4, 0.6], [0.6, 0.4], [0.4, 0.6]])
    good = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.9, 0.1], [0.1, 0.9]])
    fair = torch.tensor([[0.8, 0.2], [0.2, 0.8], [0.8, 0.2], [0.2, 0.8]])
    pool.add([ROOT_CANDIDATE, 0, 1], [parent, good, fair])
    chosen = pool.choose()
    assert len(chosen) == 3 and pool.ensemble_loss(chosen) > pool.ensemble_loss([0])  # filled past a rise
    assert pool.ensemble_loss(chosen) <= loss(parent)


def test_pool_fitness_is_the_ensemble_loss_with_the_candidate() -> None:
    labels = torch.tensor([0, 1])
    pool = EnsemblePool(3, lambda probs: nll(probs, labels))
    a = torch.tensor([[0.9, 0.1], [0.4, 0.6]])
    b = torch.tensor([[0.6, 0.4], [0.1, 0.9]])
    pool.add([ROOT_CANDIDATE], [a])
    pool.choose()
    (fitness,) = pool.add([0], [b])
    assert fitness == pytest.approx(nll((a + b) / 2, labels))


# --- whole runs ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned")
    return evo_subens.run(tiny_dict(out / "runs", dict(TUNED, name="tuned")), progress=lambda line: None)


@pytest.mark.slow
def test_tuned_run_scores_tuned_candidates_in_the_ensemble(tuned_run) -> None:
    """Every candidate carries its ensemble-aware fitness and its step scale; the members are the pool's
    greedy ensemble, stored with the tuned weights they were scored with, and its selection-split NLL is
    at most the parent's."""
    population, metrics = tuned_run.population, tuned_run.metrics
    candidates = population[population["generation"] >= 0]
    assert candidates["ensemble_nll"].notna().all()
    assert candidates["step_scale"].gt(0).all() and candidates["step_scale"].nunique() > 1
    checks = metrics["search"]["generations"]
    assert [c["generation"] for c in checks] == [0, 1]
    assert all("holdout_ensemble_nll" in c for c in checks)
    assert checks[-1]["ensemble_nll"] <= checks[0]["ensemble_nll"]  # the pool only grows
    states = _member_states(tuned_run.run_dir)
    parent = torch.load(tuned_run.run_dir / "parent.pt", weights_only=True)
    ensemble_nll = _selection_nll(tuned_run, states)
    assert ensemble_nll == pytest.approx(checks[-1]["ensemble_nll"], rel=1e-6)
    assert ensemble_nll <= _selection_nll(tuned_run, [parent])
    members = population[population["is_member"]]
    assert sorted(members["candidate"]) == sorted(checks[-1]["members"])
    assert metrics["cost"]["train_epochs"] == 4 + 1 * 8  # the parent, then one tune per candidate


@pytest.mark.slow
def test_tuned_run_with_only_broken_children_ships_the_parent(tmp_path: Path) -> None:
    """Children the tuning cannot repair never join: the ensemble is the parent alone, and says so."""
    lines: list[str] = []
    extra = deep_merge(TUNED, {"children": {"sigma": 60.0, "density": 1.0},
                               "finetune": {"epochs": 1, "lr": 1e-6}, "name": "broken"})
    result = evo_subens.run(tiny_dict(tmp_path / "runs", extra), progress=lines.append)
    assert json.loads((result.run_dir / "members.json").read_text())[0]["candidate"] == ROOT_CANDIDATE
    assert len(result.metrics["members"]) == 1
    assert result.metrics["ensemble"]["nll"] == pytest.approx(result.metrics["parent"]["nll"])
    assert any("the ensemble is the parent alone" in line for line in lines)
    assert bool(result.population.loc[result.population["candidate"] == ROOT_CANDIDATE, "is_member"].item())


@pytest.mark.slow
def test_raw_loop_ensemble_worse_than_parent_is_replaced_by_the_parent(tmp_path: Path) -> None:
    """Acceptance keeps its first member whatever it scores; the parent guarantee replaces an ensemble
    whose selection-split NLL is above the parent's."""
    lines: list[str] = []
    extra = {"children": {"sigma": 60.0, "density": 1.0}, "search": {"fitness": "nll", "generations": 1},
             "ensemble": {"acceptance": True}, "name": "raw-broken"}
    result = evo_subens.run(tiny_dict(tmp_path / "runs", extra), progress=lines.append)
    assert any("the ensemble is the parent alone" in line for line in lines)
    members = json.loads((result.run_dir / "members.json").read_text())
    assert [m["candidate"] for m in members] == [ROOT_CANDIDATE]
    assert result.metrics["ensemble"]["nll"] == pytest.approx(result.metrics["parent"]["nll"])


def test_a_parent_that_did_not_learn_stops_the_run(tmp_path: Path) -> None:
    """A parent near chance stops the run before the search, naming the settings to change."""
    extra = {"parent": {"lr": 1e-6, "epochs": 2}, "name": "unlearned"}
    with pytest.raises(UserError, match=r"the parent did not learn.*parent\.lr \(now 1e-06.*parent\.epochs \(now 2\)"):
        evo_subens.run(tiny_dict(tmp_path / "runs", extra), progress=lambda line: None)
    assert not (tmp_path / "runs" / "unlearned" / "population.parquet").exists()


def test_tuned_scoring_refuses_what_it_cannot_honour(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="finetune.epochs"):
        config_from_dict(tiny_dict(tmp_path, {"search": {"scoring": "tuned"}, "finetune": {"epochs": 0}}))
    with pytest.raises(ConfigError, match="search.racing"):
        config_from_dict(tiny_dict(tmp_path, deep_merge(TUNED, {"search": {"racing": True}})))
    rl = tiny_dict(tmp_path, TUNED)
    rl["task"] = "rl"
    for section in ("data", "model", "children"):
        rl.pop(section)
    with pytest.raises(ConfigError, match="search.scoring"):
        config_from_dict(rl)


@pytest.mark.slow
def test_sparse_children_under_tuned_scoring_keep_their_masks(tmp_path: Path) -> None:
    """Sparse children are tuned by their own children.tune (not again by finetune) and pooled: members keep
    their pruned weights at zero and the ensemble's selection NLL is at most the parent's."""
    extra = deep_merge(TUNED, {"name": "sparse-tuned", "finetune": {"epochs": 0}})
    config = tiny_dict(tmp_path / "runs", extra)
    config["children"] = {"family": "sparse", "mask": "random", "sparsity": 0.3, "tune": {"epochs": 1}}
    result = evo_subens.run(config, progress=lambda line: None)
    assert result.metrics["cost"]["train_epochs"] == 4 + 1 * 8
    checks = result.metrics["search"]["generations"]
    parent = torch.load(result.run_dir / "parent.pt", weights_only=True)
    assert checks[-1]["ensemble_nll"] <= _selection_nll(result, [parent])
    from evo_subens.ensemble import load_ensemble

    ensemble = load_ensemble(result.run_dir)
    for member, candidate in zip(ensemble.members, checks[-1]["members"]):
        if candidate == ROOT_CANDIDATE:
            continue
        weights = [p for name, p in member.named_parameters() if name.endswith("weight")][0]
        assert 0.2 < float((weights == 0).float().mean()) < 0.4  # the child's own 30% stays pruned


@pytest.mark.slow
@pytest.mark.ray
def test_tuned_candidates_in_ray_actors_equal_in_process(ray_session, tuned_run, tmp_path: Path) -> None:
    """Two Ray actors tune and score the same candidates to the same log, members and metrics."""
    extra = deep_merge(TUNED, {"workers": {"executor": "ray", "num_actors": 2}, "name": "tuned-ray"})
    remote = evo_subens.run(tiny_dict(tmp_path / "runs", extra), progress=lambda line: None)
    pd.testing.assert_frame_equal(remote.population.drop(columns=RUNTIME_COLUMNS),
                                  tuned_run.population.drop(columns=RUNTIME_COLUMNS))
    for mine, theirs in zip(_member_states(remote.run_dir), _member_states(tuned_run.run_dir)):
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert remote.metrics["ensemble"] == tuned_run.metrics["ensemble"]


@pytest.mark.slow
def test_tuned_run_killed_mid_generation_resumes_bit_exact(tuned_run, cli_command, tmp_path: Path) -> None:
    """SIGKILL inside generation 1 (generation 0's tuned members live only in the dead process), resume:
    the same population log, member weights and metrics as the uninterrupted run."""
    config = dict(deep_merge(TINY, TUNED), output_dir=str(tmp_path / "runs"))
    path = tmp_path / "tuned.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = dict(os.environ, EVO_SUBENS_CRASH_AT="search.mid_generation:2")
    killed = subprocess.run(cli_command + ["run", str(path), "name=killed"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    env.pop("EVO_SUBENS_CRASH_AT")
    run_dir = tmp_path / "runs" / "killed"
    resumed = subprocess.run(cli_command + ["resume", str(run_dir)], capture_output=True, text=True, env=env,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    population = pd.read_parquet(run_dir / "population.parquet").drop(columns=RUNTIME_COLUMNS)
    pd.testing.assert_frame_equal(population, tuned_run.population.drop(columns=RUNTIME_COLUMNS))
    for mine, theirs in zip(_member_states(run_dir), _member_states(tuned_run.run_dir)):
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["ensemble"] == tuned_run.metrics["ensemble"]
    assert not math.isnan(metrics["search"]["generations"][-1]["ensemble_nll"])
