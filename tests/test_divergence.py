"""Diverged children (NaN or infinite validation metrics): logged with a flag, ranked last, never elites or
members, counted in the summary; a generation where every child diverged stops the run with exit code 2
and a run directory that resume can read."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from evo_subens import cli, load_population
from evo_subens.core.config import load_config
from evo_subens.errors import ConfigError
from evo_subens.core.logs import ADDED_COLUMNS
from evo_subens.core.rundir import write_population
from evo_subens.core.runner import run
from evo_subens.core.search import CandidateRecord
from evo_subens.families.noisy import NoisyFamily

from conftest import tiny_dict

# Half of the children get an absolute sigma of 1e30: their weights and logits overflow.
# Sigma stays as configured in every generation (no step-size adaptation).
HALF_DIVERGED = {"children": {"sigma_mode": "absolute", "sigma": 0.05, "sigma_grid": [0.05, 1e30]},
                 "search": {"fitness": "nll", "step_size": "constant"}}


def _check_half_diverged(result, lines: list[str]) -> None:
    pop = result.population
    pop = pop[pop.generation >= 0]  # the candidates, without the parent's reference row
    bad = pop[pop.diverged]
    assert len(bad) == len(pop) // 2 and (bad.sigma == 1e30).all()
    assert bad.val_nll.isna().all() and bad.val_accuracy.isna().all() and bad.fitness.isna().all()
    assert not bad.is_elite.any() and not bad.is_member.any()
    members = pop[pop.is_member]
    assert len(members) == 3 and members.val_nll.map(math.isfinite).all()
    for key in ("accuracy", "nll", "ece"):
        assert math.isfinite(result.metrics["ensemble"][key])
        assert all(math.isfinite(m[key]) for m in result.metrics["members"])
    assert any(line.startswith(f"diverged candidates: {len(bad)} of {len(pop)}") for line in lines)
    assert sum("candidates of generation" in line and "diverged" in line for line in lines) == 2


@pytest.fixture(scope="module")
def half_local(tmp_path_factory: pytest.TempPathFactory):
    """The half-diverging run in-process, and its progress lines (shared: the Ray run is compared with it)."""
    lines: list[str] = []
    result = run(tiny_dict(tmp_path_factory.mktemp("half"), dict(HALF_DIVERGED, name="half")), progress=lines.append)
    return result, lines


@pytest.mark.slow
def test_some_children_diverge_and_the_run_finishes_with_finite_members(half_local) -> None:
    _check_half_diverged(*half_local)


@pytest.mark.ray
@pytest.mark.slow
def test_actors_flag_diverged_children_like_the_local_executor(ray_session, half_local, tmp_path: Path) -> None:
    lines: list[str] = []
    extra = dict(HALF_DIVERGED, name="half-ray", workers={"executor": "ray", "num_actors": 2})
    result = run(tiny_dict(tmp_path, extra), progress=lines.append)
    _check_half_diverged(result, lines)
    local, _ = half_local
    assert result.population.diverged.tolist() == local.population.diverged.tolist()
    assert result.member_genomes == local.member_genomes


@pytest.mark.slow
def test_all_children_diverging_stops_with_a_clear_error(tmp_path: Path, tiny_yaml_text: str,
                                                         cli_command: list[str], capsys: pytest.CaptureFixture) -> None:
    """`children.sigma=1e30` (absolute): exit 2, one line naming the setting, no traceback; the run
    directory keeps the log and checkpoints, and resume reads it and stops with the same error."""
    (tmp_path / "tiny.yaml").write_text(tiny_yaml_text)
    args = ["tiny.yaml", "name=boom", "children.sigma=1e30", "children.sigma_mode=absolute"]
    proc = subprocess.run([*cli_command, "run", *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    [error] = proc.stderr.strip().splitlines()
    assert "every candidate of generation 0 diverged" in error
    assert "sigma 1e+30" in error and "children.sigma" in error
    run_dir = tmp_path / "runs" / "boom"
    pop = load_population(run_dir)
    pop = pop[pop.generation >= 0]
    assert pop.diverged.all() and len(pop) == 8 and pop.val_nll.isna().all()
    assert list((run_dir / "checkpoints").glob("ckpt-*.pt"))
    assert cli.main(["resume", str(run_dir)]) == 2  # the command's code, in this process
    assert "generation 1 diverged" in capsys.readouterr().err  # it went on from the checkpoint of generation 0


@pytest.mark.slow
def test_huge_but_finite_noise_warns_about_members(tmp_path: Path) -> None:
    """sigma 1e3 (relative): children are finite but useless; the summary says so."""
    lines: list[str] = []
    run(tiny_dict(tmp_path, {"name": "loud", "children": {"sigma": 1e3}}), progress=lines.append)
    assert any(line.startswith("warning: 3 member(s) predict the validation split worse than a uniform guess")
               for line in lines)


@pytest.mark.parametrize("override", ["children.sigma=.inf", "children.sigma_grid=[0.3, .inf]",
                                      "children.sigma=.nan"])
def test_infinite_sigma_is_refused(override: str) -> None:
    with pytest.raises(ConfigError, match="children.sigma"):
        load_config(None, [override])


def test_logs_and_checkpoints_from_before_the_flag_still_load(tmp_path: Path) -> None:
    row = {"generation": 0, "candidate": 0, "parent": -1, "genome": "{}", "fitness": 0.5, "val_accuracy": 0.5,
           "val_nll": 1.0, "eval_seconds": 0.1, "worker": -1, "is_elite": True, "node": "local", "raced": False}
    assert CandidateRecord.from_row(row).diverged is False  # a checkpoint's records, written without the field
    full = dict(row, seed=1, mask_seed=2, density=0.1, sigma=0.1, depth=1, is_member=True, worker="local",
                diverged=False)
    write_population(tmp_path / "population.parquet", [full], NoisyFamily.log_columns, ["accuracy", "nll"])
    old = pd.read_parquet(tmp_path / "population.parquet").drop(columns=["diverged"])
    old.to_parquet(tmp_path / "population.parquet", index=False)
    assert "diverged" in ADDED_COLUMNS
    assert load_population(tmp_path).diverged.tolist() == [False]
