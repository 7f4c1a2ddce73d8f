"""Runs you can trust: SIGKILL at several points, resume, and get what an uninterrupted run gets.

Every kill test runs the real ``evo-subens`` command in a subprocess, kills it with SIGKILL at a crash
point (``EVO_SUBENS_CRASH_AT``), resumes it (``evo-subens resume``) and compares population.parquet,
members.json and metrics.json with an uninterrupted run of the same config.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

import evo_subens
from evo_subens.core.runner import _extension_note
from evo_subens import cli
from evo_subens.errors import RunDirError
from evo_subens.tasks import unused_sections

from conftest import RUNTIME_COLUMNS, TINY, deep_merge, untimed


# Three generations and a fine-tune pass so every crash point is visited.
CRASH_CONFIG = deep_merge(TINY, {"search": {"generations": 3}, "finetune": {"epochs": 1, "lr": 0.01},
                                 "ensemble": {"acceptance": True}})


def _write_config(folder: Path, config: dict) -> Path:
    path = folder / "crash.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _cli(cli_command: list[str], args: list[str], crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("EVO_SUBENS_CRASH_AT", None)
    if crash_at:
        env["EVO_SUBENS_CRASH_AT"] = crash_at
    return subprocess.run(cli_command + args, capture_output=True, text=True, env=env, timeout=300)


def _killed_run(cli_command: list[str], config: Path, name: str, crash_at: str, *overrides: str) -> Path:
    """Start ``evo-subens run`` and check it died by SIGKILL at ``crash_at``; returns its run dir."""
    killed = _cli(cli_command, ["run", str(config), f"name={name}", *overrides], crash_at=crash_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    return config.parent / "runs" / name


def _resumed(cli_command: list[str], run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``evo-subens resume`` that must succeed."""
    resumed = _cli(cli_command, ["resume", str(run_dir), *overrides])
    assert resumed.returncode == 0, resumed.stderr
    return resumed


def _outputs(run_dir: Path) -> tuple[pd.DataFrame, list, dict]:
    population = pd.read_parquet(run_dir / "population.parquet").drop(columns=RUNTIME_COLUMNS)
    members = json.loads((run_dir / "members.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return population, members, metrics


def _assert_same_run(run_dir: Path, reference: Path) -> None:
    population, members, metrics = _outputs(run_dir)
    ref_population, ref_members, ref_metrics = _outputs(reference)
    pd.testing.assert_frame_equal(population, ref_population)
    assert members == ref_members
    assert untimed(metrics) == untimed(ref_metrics)
    for i, member in enumerate(members):
        if member["weights"]:
            mine = torch.load(run_dir / member["weights"], weights_only=True)
            theirs = torch.load(reference / member["weights"], weights_only=True)
            assert all(torch.equal(mine[k], theirs[k]) for k in mine), f"member {i} weights differ"


@pytest.fixture(scope="module")
def crash_setup(tmp_path_factory, cli_command) -> tuple[Path, Path]:
    """The crash config file and its uninterrupted reference run."""
    folder = tmp_path_factory.mktemp("crash")
    config = _write_config(folder, dict(CRASH_CONFIG, output_dir=str(folder / "runs")))
    done = _cli(cli_command, ["run", str(config), "name=reference"])
    assert done.returncode == 0, done.stderr
    return config, folder / "runs" / "reference"


@pytest.fixture(scope="module")
def killed_copy(crash_setup, cli_command):
    """Factory ``killed_copy(crash_at, name)``: a fresh copy, named ``name``, of a run of the crash config
    killed at ``crash_at``. Each point is killed once per module; tests that start from the same kill get
    their own copy to resume, corrupt or kill again."""
    config, _ = crash_setup
    killed: dict[str, Path] = {}

    def make(crash_at: str, name: str) -> Path:
        if crash_at not in killed:
            slug = crash_at.replace(":", "-").replace(".", "-")
            killed[crash_at] = _killed_run(cli_command, config, "shared-killed-" + slug, crash_at)
        copy = config.parent / "runs" / name
        shutil.copytree(killed[crash_at], copy)
        return copy

    return make


# (crash point, what the kill interrupts)
KILL_POINTS = [
    ("search.mid_generation:2", "inside generation 2, half its candidates evaluated"),
    ("search.after_generation:1", "between generations 1 and 2"),
    ("checkpoint.write:3", "while writing the checkpoint of generation 2"),
    ("finetune.after_member:1", "during fine-tuning, after member 1 of 3"),
]


@pytest.mark.slow
@pytest.mark.parametrize("crash_at", [p for p, _ in KILL_POINTS], ids=[d for _, d in KILL_POINTS])
def test_killed_and_resumed_run_equals_uninterrupted(crash_setup, killed_copy, cli_command, crash_at: str) -> None:
    """SIGKILL at the point, resume: same population log, members (and their weights) and metrics."""
    config, reference = crash_setup
    run_dir = killed_copy(crash_at, "killed-" + crash_at.replace(":", "-").replace(".", "-"))
    assert not (run_dir / "metrics.json").exists()
    assert "[resume] from ckpt-" in _resumed(cli_command, run_dir).stdout
    _assert_same_run(run_dir, reference)


@pytest.mark.slow
@pytest.mark.ray
def test_resume_during_finetune_tunes_on_ray_actors(crash_setup, killed_copy, cli_command) -> None:
    """A run killed while fine-tuning, resumed with Ray actors: the members left tune on the actors (a
    resume evaluates nothing before, and actors used to start only at the first evaluation), to the same
    result as the uninterrupted in-process run."""
    config, reference = crash_setup
    run_dir = killed_copy("finetune.after_member:1", "killed-finetune-to-ray")
    resumed = _resumed(cli_command, run_dir, "workers.executor=ray", "workers.num_actors=2")
    assert re.search(r"\[finetune\] 2 member\(s\), 1 epoch\(s\) each, 2 Ray actors on cpu, node \S+ \(2\)",
                     resumed.stdout), resumed.stdout
    _assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_killed_repeatedly(crash_setup, killed_copy, cli_command) -> None:
    """Killed three times at different points, resumed each time: still the uninterrupted result."""
    config, reference = crash_setup
    run_dir = killed_copy("search.after_generation:1", "killed-thrice")
    second = _cli(cli_command, ["resume", str(run_dir)], crash_at="checkpoint.write:2")
    assert second.returncode == -signal.SIGKILL
    third = _cli(cli_command, ["resume", str(run_dir)], crash_at="finetune.after_member:2")
    assert third.returncode == -signal.SIGKILL
    _resumed(cli_command, run_dir)
    _assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_killed_before_any_checkpoint_restarts_cleanly(crash_setup, killed_copy, cli_command) -> None:
    """Killed during the very first checkpoint write (no checkpoint yet): resume starts over."""
    config, reference = crash_setup
    run_dir = killed_copy("checkpoint.write:1", "killed-first")
    assert not list((run_dir / "checkpoints").glob("ckpt-*.pt"))
    _resumed(cli_command, run_dir)
    _assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_population_log_keeps_finished_generations(killed_copy) -> None:
    """A run killed after generation 2 keeps generations 1-2 in population.parquet, readable by pandas."""
    run_dir = killed_copy("search.after_generation:2", "killed-log")
    population = evo_subens.load_population(run_dir)
    assert sorted(population["generation"].unique()) == [-1, 0, 1]  # -1: the parent's reference row
    assert len(population) == 1 + 2 * CRASH_CONFIG["search"]["population"]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_corrupted_latest_checkpoint_falls_back(crash_setup, killed_copy, cli_command) -> None:
    """A truncated newest checkpoint is reported and the previous one is used; the result is unchanged."""
    config, reference = crash_setup
    run_dir = killed_copy("search.after_generation:2", "corrupt-latest")
    newest = sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[:100])
    resumed = _resumed(cli_command, run_dir)
    assert f"checkpoint {newest} is unreadable" in resumed.stdout
    assert "falling back to the previous checkpoint" in resumed.stdout
    _assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_no_usable_checkpoint_is_an_error_and_touches_nothing(killed_copy, cli_command) -> None:
    """Every checkpoint corrupted: exit 2 naming the folder, no file changed."""
    run_dir = killed_copy("search.after_generation:1", "all-corrupt")
    for path in (run_dir / "checkpoints").glob("ckpt-*.pt"):
        path.write_bytes(b"not a checkpoint")
    before = _digest(run_dir)
    resumed = _cli(cli_command, ["resume", str(run_dir)])
    assert resumed.returncode == 2
    assert "no usable checkpoint" in resumed.stderr and "Traceback" not in resumed.stderr
    assert _digest(run_dir) == before


def test_missing_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Resuming a folder that does not exist: exit 2 naming it (the command's code, run in this process)."""
    assert cli.main(["resume", str(tmp_path / "nope")]) == 2
    assert f"run directory {tmp_path / 'nope'} does not exist" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("override, field", [("seed=7", "seed"), ("data.name=mnist1d", "data.name"),
                                             ("children.sigma=0.1", "children.sigma"),
                                             ("model.kwargs={hidden: [8]}", "model.kwargs")])
def test_incompatible_resume_is_refused(crash_setup, override: str, field: str,
                                        capsys: pytest.CaptureFixture) -> None:
    """Changing model, data, family or seed on resume: exit 2 naming the field, nothing written (the
    command's code, run in this process)."""
    _, reference = crash_setup
    before = _digest(reference)
    assert cli.main(["resume", str(reference), override]) == 2
    assert f"cannot resume {reference} with {field}=" in capsys.readouterr().err
    assert _digest(reference) == before


@pytest.mark.slow
def test_extending_a_finished_search_equals_a_longer_run(tmp_path: Path) -> None:
    """Run 2 generations, resume with search.generations=3: the same as running 3 from the start."""
    quiet = {"progress": lambda line: None}
    short = evo_subens.run(dict(TINY, output_dir=str(tmp_path), name="short"), **quiet)
    lines: list[str] = []
    evo_subens.resume(short.run_dir, ["search.generations=3"], progress=lines.append)
    assert "[resume] the search goes on from 2 to 3 generations" in lines
    longer = evo_subens.run(deep_merge(TINY, {"output_dir": str(tmp_path), "name": "long",
                                              "search": {"generations": 3}}), **quiet)
    _assert_same_run(short.run_dir, longer.run_dir)
    assert yaml.safe_load((short.run_dir / "config.yaml").read_text())["search"]["generations"] == 3


def test_extending_says_whether_patience_can_stop_it(tiny_config, tmp_path: Path) -> None:
    """resume search.generations=G says up front what runs: nothing after an early stop (pointing to grow),
    or up to G generations unless search.patience stops it first."""
    cfg = tiny_config(tmp_path, {"search": {"patience": 2, "generations": 6}})
    stopped = _extension_note(cfg, {"generation": 3, "stopped": True, "stalled": 2}, tmp_path)
    assert "adds no generation: the search stopped early after generation 2" in stopped
    assert "search.patience" in stopped and f"evo-subens grow {tmp_path}" in stopped
    going = _extension_note(cfg, {"generation": 3, "stopped": False, "stalled": 1}, tmp_path)
    assert "goes on from 3 to 6 generations unless it stops early" in going and "(1 so far)" in going


@pytest.mark.slow
def test_resume_may_change_workers(tmp_path: Path) -> None:
    """workers.* are compatible changes (here: in-process -> 2 threads) and change no result."""
    quiet = {"progress": lambda line: None}
    first = evo_subens.run(dict(TINY, output_dir=str(tmp_path), name="a"), **quiet)
    reference = _outputs(first.run_dir)
    evo_subens.resume(first.run_dir, ["search.generations=2", "workers.threads_per_actor=2"], **quiet)
    again = _outputs(first.run_dir)
    pd.testing.assert_frame_equal(reference[0], again[0])
    assert reference[1:] == again[1:]


@pytest.mark.slow
def test_runs_written_before_newer_fields_still_resume_and_load(tmp_path: Path) -> None:
    """A run directory from before config fields and log columns were added: resume fills the defaults
    (which reproduce the old behaviour) and the population log loads with the old meaning of the columns."""
    quiet = {"progress": lambda line: None}
    # What runs did before step-size adaptation, early stopping, acceptance and the held-back part existed.
    before = deep_merge(TINY, {"search": {"step_size": "constant", "patience": 0},
                               "ensemble": {"acceptance": False, "holdout": 0.0}})
    first = evo_subens.run(dict(before, output_dir=str(tmp_path), name="old"), **quiet)
    reference = _outputs(first.run_dir)
    config = yaml.safe_load((first.run_dir / "config.yaml").read_text())
    for section, name in (("", "method"), ("", "baseline"), ("children", "density_grid"),
                          ("search", "racing"), ("workers", "activation_cache_mb"), ("workers", "autocast"),
                          ("search", "step_size"), ("search", "patience"), ("ensemble", "acceptance"),
                          ("ensemble", "holdout")):
        (config[section] if section else config).pop(name)
    (first.run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    pd.read_parquet(first.run_dir / "population.parquet").drop(columns=["node", "raced"]).to_parquet(
        first.run_dir / "population.parquet")
    old_log = evo_subens.load_population(first.run_dir)
    assert (old_log.node == "").all() and not old_log.raced.any()
    evo_subens.resume(first.run_dir, **quiet)
    again = _outputs(first.run_dir)
    pd.testing.assert_frame_equal(reference[0], again[0])
    assert reference[1:] == again[1:]


@pytest.mark.slow
def test_replaced_parent_file_is_refused(tmp_path: Path) -> None:
    """A parent.pt that is not the checkpoint's parent is refused by name, not silently used."""
    quiet = {"progress": lambda line: None}
    result = evo_subens.run(dict(TINY, output_dir=str(tmp_path), name="p"), **quiet)
    state = torch.load(result.run_dir / "parent.pt", weights_only=True)
    state = {k: v + 1 for k, v in state.items()}
    torch.save(state, result.run_dir / "parent.pt")
    with pytest.raises(RunDirError, match="parent.pt is not the parent"):
        evo_subens.resume(result.run_dir, **quiet)


@pytest.mark.slow
def test_truncated_population_log(tmp_path: Path) -> None:
    """load_population on a truncated Parquet file names the file."""
    result = evo_subens.run(dict(TINY, output_dir=str(tmp_path), name="t"), progress=lambda line: None)
    path = result.run_dir / "population.parquet"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(RunDirError, match="population log .*population.parquet is unreadable"):
        evo_subens.load_population(result.run_dir)


@pytest.mark.slow
def test_grow_adds_members_without_redoing(tmp_path: Path) -> None:
    """grow keeps the members, evolves one more generation and adds the best new distinct candidates, and
    says so: which generation it runs, what config.yaml now says, and the new members counted as new."""
    quiet = {"progress": lambda line: None}
    result = evo_subens.run(deep_merge(TINY, {"output_dir": str(tmp_path), "name": "g",
                                              "finetune": {"epochs": 1, "lr": 0.01}}), **quiet)
    parent_bytes = (result.run_dir / "parent.pt").read_bytes()
    old_members = json.loads((result.run_dir / "members.json").read_text())
    old_population = evo_subens.load_population(result.run_dir)
    lines: list[str] = []
    grown = evo_subens.grow(result.run_dir, members=2, progress=lines.append)
    assert ("[grow] 3 members + up to 2 new: 1 more search generation(s) (generation 2), then the best new "
            "distinct candidates fine-tuned and offered to the ensemble; config.yaml: search.generations 2 -> 3, "
            "ensemble.size 3 -> 5") in lines
    assert any(line.startswith("[finetune] 2 new member(s), 1 epoch(s) each") for line in lines), lines
    done = [line for line in lines if line.endswith("done") or line.endswith(")") and "new member" in line]
    assert [line.split("  ")[0] for line in done if "new member" in line] == [
        "[finetune] new member 1/2 done (member 4 of 5)", "[finetune] new member 2/2 done (member 5 of 5)"]
    members = json.loads((result.run_dir / "members.json").read_text())
    assert members[:3] == old_members
    assert len(members) == 5 and len({m["genome"] for m in members}) == 5
    assert len(grown.metrics["members"]) == 5
    population = grown.population
    assert len(population) == len(old_population) + TINY["search"]["population"]
    unchanged = ["is_member", *RUNTIME_COLUMNS]  # the parent's row is scored again, so timed again
    pd.testing.assert_frame_equal(population.iloc[: len(old_population)].drop(columns=unchanged),
                                  old_population.drop(columns=unchanged))
    assert population["is_member"].sum() == 5
    assert (result.run_dir / "parent.pt").read_bytes() == parent_bytes  # the parent was not retrained
    config = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert config["ensemble"]["size"] == 5 and config["search"]["generations"] == 3


@pytest.mark.slow
def test_load_runs_flattens_configs(tmp_path: Path) -> None:
    """load_runs concatenates every run's log with its config as columns, ready for groupby."""
    quiet = {"progress": lambda line: None}
    for sigma in (0.2, 0.4):
        evo_subens.run(deep_merge(TINY, {"output_dir": str(tmp_path), "name": f"s{sigma}",
                                         "children": {"sigma": sigma}}), **quiet)
    runs = evo_subens.load_runs(tmp_path)
    assert set(runs["run"]) == {"s0.2", "s0.4"}
    assert runs.groupby("children.sigma").size().to_dict() == {0.2: 17, 0.4: 17}  # 16 candidates + the parent
    assert (runs["search.population"] == 8).all()
    # Only the fields a classification run reads: no rl sections, no baseline's; all of them on request.
    sections = {column.split(".")[0] for column in runs.columns if "." in column}
    assert sections == {"data", "model", "parent", "children", "search", "workers", "finetune", "ensemble", "tracking"}
    assert {"env.id", "ppo.lr", "policy.name", "baseline.members"} <= set(evo_subens.load_runs(tmp_path,
                                                                                             all_columns=True))
    # An rl run reads the other task's sections; baselines and packed runs read theirs.
    assert unused_sections("rl", "subnetworks") == {"data", "parent", "baseline", "packed"}
    assert unused_sections("classification", "deep_ensemble") == {"env", "ppo", "policy", "packed"}
    assert unused_sections("classification", "packed") == {"env", "ppo", "policy", "baseline"}


@pytest.mark.slow
def test_killed_grow_resumes_to_the_same_ensemble(crash_setup, cli_command) -> None:
    """grow killed after its new generation, then resumed: the same members and metrics as a grow that
    ran through (the current members are kept in both)."""
    _, reference = crash_setup
    straight, killed = reference.parent / "grow-straight", reference.parent / "grow-killed"
    shutil.copytree(reference, straight)
    shutil.copytree(reference, killed)
    assert _cli(cli_command, ["grow", str(straight), "--members", "2"]).returncode == 0
    crashed = _cli(cli_command, ["grow", str(killed), "--members", "2"], crash_at="search.after_generation:1")
    assert crashed.returncode == -signal.SIGKILL
    _resumed(cli_command, killed)
    _assert_same_run(killed, straight)
    members = json.loads((killed / "members.json").read_text())
    assert members[:3] == json.loads((reference / "members.json").read_text())


@pytest.mark.ray
@pytest.mark.slow
def test_killed_ray_run_resumes_to_the_same_result(crash_setup, cli_command) -> None:
    """The same with Ray actors: the driver SIGKILLed between generations, resumed with its own Ray."""
    config, reference = crash_setup
    run_dir = _killed_run(cli_command, config, "killed-ray", "search.after_generation:2", "workers.executor=ray")
    assert "Ray actors" in _resumed(cli_command, run_dir).stdout
    _assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_parent_file_that_does_not_fit(crash_setup, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A parent state_dict for another architecture: exit 2 naming the file, no run directory made (the
    command's code, run in this process: an uncaught error would fail the test)."""
    config, reference = crash_setup
    wrong = tmp_path / "wrong-parent.pt"
    torch.save({"weight": torch.zeros(3, 3)}, wrong)
    assert cli.main(["run", str(config), "name=wrong-parent", f"model.parent_path={wrong}"]) == 2
    err = capsys.readouterr().err
    assert str(wrong) in err and "does not fit the architecture" in err
    assert "Traceback" not in err
    assert not (reference.parent / "wrong-parent").exists()
