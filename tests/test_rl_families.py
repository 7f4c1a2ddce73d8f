"""Every family on policies (CartPole): sparse and stochastic children tuned with PPO on training episodes,
members fine-tuned with PPO, tuned weights a function of the genome in any evaluator and process, and a
killed sparse run resuming to the same result.

The sparse run trains the tiny parent once; the other runs start from its ``parent.pt``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

import evo_subens
from evo_subens.core.config import FinetuneConfig, TuneConfig, config_from_dict
from evo_subens.core.logs import read_run_config
from evo_subens.core.worker import parent_fingerprint
from evo_subens.errors import ConfigError
from evo_subens.families.base import decode_genome
from evo_subens.tasks import make_task
from evo_subens.tasks.rl.config import EnvConfig, PolicyConfig, PPOConfig
from evo_subens.tasks.rl.policies import build_policy
from evo_subens.tasks.rl.training import PPOTrainer

from conftest import RUNTIME_COLUMNS
from test_resume import _assert_same_run, _cli, _killed_run, _resumed
from test_rl_task import rl_config

# PPO scale: Adam at 2.5e-4, one batch (4 copies x 128 steps) per tuned child.
TUNE = {"epochs": 1, "lr": 2.5e-4, "optimizer": "adam", "weight_decay": 0.0}
SPARSE = {"family": "sparse", "sparsity": 0.5, "tune": TUNE}
STOCHASTIC = {"family": "stochastic", "sparsity": 0.5, "anneal_start": 0.5, "anneal_fraction": 0.5, "tune": TUNE}
FINETUNE = {"epochs": 1, "lr": 2.5e-4, "optimizer": "adam", "weight_decay": 0.0}
TINY_ENV = EnvConfig(num_envs=4, max_episode_steps=100)
TINY_PPO = PPOConfig(num_steps=128)


def config(output_dir: Path, children: dict | None = None, **sections) -> dict:
    """TINY_RL with ``children`` replacing its section (not merged into the noisy one) and ``sections`` merged;
    every selected candidate joins (no acceptance), so every member can be checked."""
    run = rl_config(output_dir, **{"ensemble": {"acceptance": False}, **sections})
    return dict(run, children=children) if children is not None else run


def evaluator_of(run_dir: Path, **payload_changes):
    """A fresh evaluator of a finished run (its config and parent), as a worker builds it."""
    task = make_task(config_from_dict(read_run_config(run_dir)), lambda line: None)
    task.load()
    state = torch.load(run_dir / "parent.pt", weights_only=True)
    payload = dataclasses.replace(task.worker_payload(state, parent_fingerprint(state)), **payload_changes)
    return payload.make_evaluator()


def stored_members(run_dir: Path, evaluator) -> list[tuple[str, dict]]:
    """(genome, weights) of the run's members, as stored in members/."""
    members = json.loads((run_dir / "members.json").read_text())
    return [(m["genome"], evaluator.family.unpack(torch.load(run_dir / m["weights"], weights_only=True),
                                                   m["genome"], evaluator.materialiser)) for m in members]


def assert_masked(evaluator, genome: str, weights: dict, parent: dict) -> None:
    """Pruned weights exactly zero, at the density the genome names; kept weights tuned away from the parent."""
    masks = evaluator.materialiser.masks(decode_genome(genome)["mask"])
    kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert kept == pytest.approx(evaluator.family.describe(genome)["density"], abs=0.01)
    for name, mask in masks.items():
        assert torch.all(weights[name][~mask] == 0), name
        assert not torch.equal(weights[name][mask], parent[name][mask]), f"{name} was not tuned"


def digest(state: dict) -> str:
    return hashlib.sha256(b"".join(state[k].numpy().tobytes() for k in sorted(state))).hexdigest()


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory: pytest.TempPathFactory) -> evo_subens.RunResult:
    return evo_subens.run(config(tmp_path_factory.mktemp("rl-sparse") / "runs", name="sparse", children=SPARSE))


@pytest.fixture(scope="module")
def parent_path(sparse_run: evo_subens.RunResult) -> str:
    return str(sparse_run.run_dir / "parent.pt")


@pytest.mark.slow
def test_sparse_rl_run_tunes_masked_children(sparse_run: evo_subens.RunResult) -> None:
    assert len(sparse_run.population) == 1 + 6 * 2
    cost = sparse_run.metrics["cost"]
    assert cost["tuning_env_steps"] == 12 * 4 * 128 and cost["finetune_env_steps"] == 0
    evaluator = evaluator_of(sparse_run.run_dir)
    parent = torch.load(sparse_run.run_dir / "parent.pt", weights_only=True)
    members = stored_members(sparse_run.run_dir, evaluator)
    assert len(members) == 3
    for genome, weights in members:
        assert_masked(evaluator, genome, weights, parent)


@pytest.mark.slow
@pytest.mark.ray
def test_ppo_tuned_children_on_ray_actors_equal_in_process(sparse_run, parent_path: str, ray_session,
                                                           tmp_path: Path) -> None:
    """Children tuned with PPO in two Ray actors score, rank and store exactly as in-process."""
    run = evo_subens.run(config(tmp_path / "runs", name="sparse-ray", children=SPARSE,
                                model={"parent_path": parent_path}, workers={"executor": "ray", "num_actors": 2}))
    pd.testing.assert_frame_equal(run.population.drop(columns=RUNTIME_COLUMNS),
                                  sparse_run.population.drop(columns=RUNTIME_COLUMNS))
    assert {"actor-0", "actor-1"} <= set(run.population["worker"])  # both actors tuned children
    for ours, theirs in zip(stored_members(run.run_dir, evaluator_of(run.run_dir)),
                            stored_members(sparse_run.run_dir, evaluator_of(sparse_run.run_dir))):
        assert ours[0] == theirs[0] and digest(ours[1]) == digest(theirs[1])
    assert run.metrics["ensemble"] == sparse_run.metrics["ensemble"]


@pytest.mark.slow
def test_tuned_child_repeats_in_a_fresh_evaluator_and_process(sparse_run: evo_subens.RunResult) -> None:
    """A member's stored weights are rebuilt bit for bit from its genome: by a fresh evaluator in this
    process, and by one in a fresh interpreter."""
    run_dir = sparse_run.run_dir
    evaluator = evaluator_of(run_dir)
    genome, weights = stored_members(run_dir, evaluator)[0]
    rebuilt = evaluator.child_state(genome)
    assert all(torch.equal(rebuilt[k], weights[k]) for k in weights)
    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from pathlib import Path
from test_rl_families import digest, evaluator_of
print(digest(evaluator_of(Path({str(run_dir)!r})).child_state(sys.stdin.read())))
"""
    proc = subprocess.run([sys.executable, "-c", script], input=genome, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == digest(rebuilt)  # bit for bit (stored weights unpack pruned -0.0 as 0.0)


@pytest.mark.slow
def test_finetuned_sparse_member_keeps_its_mask(sparse_run: evo_subens.RunResult) -> None:
    """Fine-tuning a pruned member with PPO re-applies its mask: it changes, its pruned weights stay zero, and
    the same (genome, seed, start) gives the same weights."""
    evaluator = evaluator_of(sparse_run.run_dir, finetune=FinetuneConfig(**FINETUNE))
    genome, weights = stored_members(sparse_run.run_dir, evaluator)[0]
    tuned = evaluator.finetuned_state(genome, 7, weights)
    assert_masked(evaluator, genome, tuned, weights)
    again = evaluator_of(sparse_run.run_dir, finetune=FinetuneConfig(**FINETUNE)).finetuned_state(genome, 7, weights)
    assert all(torch.equal(tuned[k], again[k]) for k in tuned)


@pytest.mark.slow
def test_stochastic_rl_run_ends_on_its_target_masks(sparse_run, parent_path: str, tmp_path: Path) -> None:
    run = evo_subens.run(config(tmp_path / "runs", name="stochastic", children=STOCHASTIC,
                                   model={"parent_path": parent_path}))
    assert len(run.population) == 1 + 6 * 2 and run.metrics["cost"]["parent_env_steps"] == 0
    evaluator = evaluator_of(run.run_dir)
    parent = torch.load(parent_path, weights_only=True)
    for genome, weights in stored_members(run.run_dir, evaluator):
        assert_masked(evaluator, genome, weights, parent)


@pytest.mark.slow
def test_rl_run_with_finetuning_stores_tuned_members(sparse_run, parent_path: str, tmp_path: Path) -> None:
    """Noisy children fine-tuned for one PPO batch: the stored members are not the children the search
    scored."""
    run = evo_subens.run(config(tmp_path / "runs", name="finetuned", finetune=FINETUNE,
                                   model={"parent_path": parent_path}))
    assert run.metrics["cost"]["finetune_env_steps"] == 3 * 4 * 128
    evaluator = evaluator_of(run.run_dir)
    for genome, weights in stored_members(run.run_dir, evaluator):
        untuned = evaluator.child_state(genome)
        assert any(not torch.equal(weights[k], untuned[k]) for k in weights)


@pytest.mark.slow
def test_killed_sparse_rl_run_resumes_to_the_same_result(sparse_run, parent_path: str, tmp_path: Path,
                                                         cli_command: list[str]) -> None:
    """Killed after its first generation, the run re-tunes the first generation's members on resuming and
    ends exactly as an uninterrupted run."""
    config_file = tmp_path / "rl-sparse.yaml"
    config_file.write_text(yaml.safe_dump(config(tmp_path / "runs", children=SPARSE,
                                                 model={"parent_path": parent_path}), sort_keys=False))
    reference = tmp_path / "runs" / "whole"
    whole = _cli(cli_command, ["run", str(config_file), "name=whole"])
    assert whole.returncode == 0, whole.stderr[-2000:]
    run_dir = _killed_run(cli_command, config_file, "killed", "search.after_generation:1")
    _resumed(cli_command, run_dir)
    _assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_ppo_trainer_takes_the_steps_it_announces() -> None:
    """``steps`` counts the optimiser steps ``train`` takes; ``forward`` sees every step in order, from the
    rollout's (the step to come) to the last update's."""
    trainer = PPOTrainer(TINY_ENV, TINY_PPO)
    policy = build_policy(PolicyConfig(), (4,), 2)
    cfg = TuneConfig(**TUNE)
    filtered, seen = [], []

    def forward(model, obs, step):
        seen.append(step)
        return model(obs)

    trainer.train(policy, cfg, seed=0, parameter_filter=filtered.append, forward=forward)
    steps = trainer.steps(cfg, len(trainer))
    assert len(trainer) == 4 * 128 and steps == 1 * 4 * 4
    assert len(filtered) == steps and sorted(set(seen)) == list(range(steps))


def test_ppo_trainer_refuses_what_it_cannot_honour() -> None:
    trainer = PPOTrainer(TINY_ENV, TINY_PPO)
    policy = build_policy(PolicyConfig(), (4,), 2)
    with pytest.raises(ValueError, match="subsample"):
        trainer.train(policy, TuneConfig(**TUNE), seed=0, subset=[0, 1])
    with pytest.raises(ValueError, match="adam"):
        trainer.train(policy, TuneConfig(epochs=1), seed=0)


@pytest.mark.slow
def test_rl_refuses_tuning_settings_ppo_cannot_honour(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="children.tune.optimizer"):
        evo_subens.run(config(tmp_path, children={"family": "sparse"}))
    with pytest.raises(ConfigError, match="children.tune.bagging"):
        evo_subens.run(config(tmp_path, children=dict(SPARSE, tune=dict(TUNE, bagging=True))))
    with pytest.raises(ConfigError, match="finetune.optimizer"):
        evo_subens.run(config(tmp_path, finetune={"epochs": 1}))
