"""Reinforcement learning through the engine (CartPole): a candidate's fitness is a function of its genome
in any process and executor, a killed run resumes to the same result, and test episodes never influence
selection."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

import evo_subens
from evo_subens.core.config import config_from_dict
from evo_subens.errors import ConfigError

from conftest import RUNTIME_COLUMNS
from test_resume import _assert_same_run, _killed_run, _resumed

pytestmark = pytest.mark.slow

TINY_RL = {
    "task": "rl", "seed": 0,
    "env": {"id": "CartPole-v1", "num_envs": 4, "validation_episodes": 8, "test_episodes": 8,
            "max_episode_steps": 100},
    "ppo": {"total_steps": 4096, "num_steps": 128},
    "children": {"family": "noisy", "density": 0.2, "sigma": 0.5, "sigma_mode": "relative"},
    "search": {"population": 6, "generations": 2, "elites": 2, "fitness": "return", "patience": 0},
    "workers": {"executor": "local"},
    "finetune": {"epochs": 0},
    "ensemble": {"size": 3, "holdout": 0.25},
}


def rl_config(output_dir: Path, **sections) -> dict:
    config = json.loads(json.dumps(TINY_RL))
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return dict(config, output_dir=str(output_dir))


@pytest.fixture(scope="module")
def rl_run(tmp_path_factory: pytest.TempPathFactory) -> evo_subens.RunResult:
    return evo_subens.run(rl_config(tmp_path_factory.mktemp("rl") / "runs", name="local"))


def test_rl_run_logs_returns_and_reports_the_ensemble(rl_run: evo_subens.RunResult) -> None:
    population, metrics = rl_run.population, rl_run.metrics
    assert "val_return" in population.columns and "val_accuracy" not in population.columns
    assert len(population) == 1 + 6 * 2
    assert set(metrics["ensembles"]) == {"mean", "vote", "gated"}
    assert 0 <= metrics["ensembles"]["gated"]["test"]["gate_open"] <= 1
    # The cost record counts the validation episodes' env steps as played (a measurement, never a criterion).
    assert population["val_env_steps"].between(8, 8 * 100).all()
    assert metrics["cost"]["evaluation_env_steps"] == population.loc[population["generation"] >= 0,
                                                                     "val_env_steps"].sum()
    for who in (metrics["parent"], metrics["ensemble"]):
        assert set(who) >= {"test", "train"} and who["test"]["episodes"] == 8
    members = population[population["is_member"]]
    best = population[population["generation"] >= 0].sort_values(["fitness", "candidate"], ascending=[False, True])
    assert sorted(members["candidate"]) == sorted(best.drop_duplicates("genome")["candidate"][:len(members)])


def test_report_of_an_rl_run(rl_run: evo_subens.RunResult) -> None:
    from evo_subens.report.run_report import write_report

    report = write_report(rl_run.run_dir, progress=lambda line: None).read_text()
    assert "| parent |" in report and "ensemble, gated" in report and (rl_run.run_dir / "fitness.png").is_file()
    assert "of test steps" in report  # how often the gated rule's members voted
    with pytest.raises(evo_subens.RunDirError, match="is a run of the rl task"):
        evo_subens.load_ensemble(rl_run.run_dir)


def test_a_genome_scores_the_same_in_another_process(rl_run: evo_subens.RunResult, tmp_path: Path) -> None:
    """The payload and a logged genome, scored in a fresh interpreter, give the logged fitness."""
    row = rl_run.population[rl_run.population["generation"] == 1].iloc[0]
    script = f"""
import sys, json
from evo_subens.core.config import config_from_dict
from evo_subens.core.logs import read_run_config
from evo_subens.tasks import make_task
from evo_subens.core.rundir import write_json
import torch
cfg = config_from_dict(read_run_config({str(rl_run.run_dir)!r}))
task = make_task(cfg, lambda line: None)
task.load()
state = torch.load({str(rl_run.run_dir / 'parent.pt')!r}, weights_only=True)
from evo_subens.core.worker import parent_fingerprint
payload = task.worker_payload(state, parent_fingerprint(state))
score = payload.make_evaluator().evaluate_many([json.loads(sys.stdin.read())])[0]
print(json.dumps(score.values))
"""
    proc = subprocess.run([sys.executable, "-c", script], input=json.dumps(row["genome"]), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)[0] == row["val_return"]


# Ray actors and the in-process executor give identical fitness: test_rl_families.py checks it with children
# tuned by PPO in two actors (the noisy children here take the same path with less work).


def test_test_episodes_never_influence_selection(rl_run: evo_subens.RunResult, tmp_path: Path) -> None:
    other = evo_subens.run(rl_config(tmp_path / "runs", name="other-test", env={"test_seed": 20_000}))
    pd.testing.assert_frame_equal(rl_run.population.drop(columns=RUNTIME_COLUMNS),
                                  other.population.drop(columns=RUNTIME_COLUMNS))
    assert other.metrics["parent"]["test"] != rl_run.metrics["parent"]["test"]  # other episodes were tested


def test_killed_rl_run_resumes_to_the_same_result(rl_run: evo_subens.RunResult, tmp_path: Path,
                                                  cli_command: list[str]) -> None:
    """Killed after its first generation and resumed from the CLI, the run ends exactly as the uninterrupted
    run of the same config."""
    config = tmp_path / "rl.yaml"
    config.write_text(yaml.safe_dump(rl_config(tmp_path / "runs"), sort_keys=False))
    run_dir = _killed_run(cli_command, config, "killed", "search.after_generation:1")
    _resumed(cli_command, run_dir)
    _assert_same_run(run_dir, rl_run.run_dir)


def test_rl_refuses_what_it_cannot_do_yet(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="search.fitness"):
        config_from_dict(rl_config(tmp_path, search={"fitness": "accuracy"}))
    with pytest.raises(ConfigError, match="ensemble.rule"):
        config_from_dict(dict(rl_config(tmp_path), task="classification", search={"fitness": "nll", "scoring": "raw"},
                              ensemble={"rule": "vote"}))
