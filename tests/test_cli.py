"""The `evo-subens` command line: help, a tiny run end to end, and user errors (exit code 2)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from evo_subens import cli

from conftest import untimed

RUN_NAME = "cli-run"


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory, tiny_yaml_text: str, cli_command: list[str]):
    """`evo-subens run tiny.yaml name=cli-run` in a fresh folder (runs go to its ./runs)."""
    cwd = tmp_path_factory.mktemp("cli")
    (cwd / "tiny.yaml").write_text(tiny_yaml_text)
    args = ["run", "tiny.yaml", f"name={RUN_NAME}", "workers.executor=local"]
    proc = subprocess.run([*cli_command, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    return cwd, args, proc


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"]], ids=["top", "run"])
def test_help_explains_overrides(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    """Both help screens exit 0 and tell the user about key=value overrides."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 0
    assert "key=value" in capsys.readouterr().out


@pytest.mark.slow
def test_tiny_run_prints_summary(cli_run) -> None:
    """A tiny run exits 0, prints the parent / best member / ensemble table and where the results are."""
    cwd, _, proc = cli_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    number = r"\s+\d+\.\d{4}"
    for label, count in (("parent", 5), ("best member", 3), (r"ensemble \(3/3\)", 5)):  # + temperature-scaled
        assert any(re.fullmatch(label + number * count, line.strip()) for line in lines), label
    assert any(line.startswith("verdict: ensemble vs parent on test") for line in lines)
    run_dir = Path("runs") / RUN_NAME
    assert str(run_dir) in proc.stdout
    for name in ("config.yaml", "parent.pt", "population.parquet", "members.json", "metrics.json"):
        assert (cwd / run_dir / name).is_file(), name


@pytest.mark.slow
def test_same_name_twice_is_refused(cli_run, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture) -> None:
    """Re-running into an existing run directory exits 2, names it, and leaves its files untouched."""
    cwd, args, proc = cli_run
    assert proc.returncode == 0
    metrics = (cwd / "runs" / RUN_NAME / "metrics.json").read_text()
    monkeypatch.chdir(cwd)
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and str(Path("runs") / RUN_NAME) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (cwd / "runs" / RUN_NAME / "metrics.json").read_text() == metrics
    json.loads(metrics)


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: every thread setting is the same")
def test_result_does_not_depend_on_omp_num_threads(cli_run, cli_command: list[str]) -> None:
    """`ray job submit` runs drivers with OMP_NUM_THREADS=1: the same config gives the same metrics.json, bit
    for bit, under it as in a plain terminal, because the driver's torch threads come from the config."""
    cwd, args, proc = cli_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = [arg if not arg.startswith("name=") else "name=cli-run-omp1" for arg in args]
    other = subprocess.run([*cli_command, *single], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert other.returncode == 0, other.stderr[-3000:]
    first, second = ({"metrics": json.loads((cwd / "runs" / name / "metrics.json").read_text()),
                      "threads": yaml.safe_load((cwd / "runs" / name / "config.yaml").read_text())["workers"][
                          "driver_threads"]} for name in (RUN_NAME, "cli-run-omp1"))
    assert first["threads"] == second["threads"] == len(os.sched_getaffinity(0))
    assert first["metrics"]["numerics"]["threads"] == first["threads"]  # recorded beside the CPU's kernels
    assert untimed(first["metrics"]) == untimed(second["metrics"])


def test_missing_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture) -> None:
    """A config path that does not exist exits 2 with a message naming the file, and creates nothing."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "does-not-exist.yaml"]) == 2
    assert "does-not-exist.yaml" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_invalid_yaml_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A file that is not YAML exits 2 naming the file."""
    path = tmp_path / "broken.yaml"
    path.write_text("search: [unclosed\n")
    assert cli.main(["config", str(path)]) == 2
    assert "broken.yaml" in capsys.readouterr().err


def test_config_command_rejects_bad_override(capsys: pytest.CaptureFixture) -> None:
    """`evo-subens config` validates too: a bad value exits 2 naming the field."""
    assert cli.main(["config", str(Path(__file__).resolve().parents[1] / "configs" / "default.yaml"),
                     "children.density=2"]) == 2
    assert "children.density" in capsys.readouterr().err


def test_config_command_with_overrides_only(capsys: pytest.CaptureFixture) -> None:
    """`evo-subens config key=value` (no file: 'default: built-in defaults') overrides the defaults."""
    assert cli.main(["config", "search.population=3", "search.elites=2"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["search"]["population"] == 3 and printed["search"]["elites"] == 2


def test_config_command_prints_what_a_run_records(capsys: pytest.CaptureFixture) -> None:
    """With model.architecture set, `evo-subens config` leaves out model.name, as config.yaml does."""
    assert cli.main(["config", "model.architecture=tabnet:TabularNet"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["architecture"] == "tabnet:TabularNet" and "name" not in printed["model"]
