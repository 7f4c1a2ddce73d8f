"""Bad input through the real command line: one line naming the field or file and what was expected, exit
code 2, no traceback, and nothing written outside output_dir; Ctrl-C says where the run stopped."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from torch import nn

from evo_subens import cli
from evo_subens.core.config import ModelConfig
from evo_subens.errors import ConfigError
from evo_subens.tasks.classification.models import build_model
from evo_subens.core.runner import run

from conftest import tiny_dict
from run_output import Lines


class ExplodingNet(nn.Module):
    """A user architecture whose constructor fails."""

    def __init__(self, width: int = 4):
        super().__init__()
        raise RuntimeError(f"width {width} needs a GPU here")


def _files(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*")}


@pytest.fixture()
def folder(tmp_path: Path, tiny_yaml_text: str) -> Path:
    """A working folder with tiny.yaml, a plain file and a directory in it."""
    (tmp_path / "tiny.yaml").write_text(tiny_yaml_text)
    (tmp_path / "a-file").write_text("not a folder\n")
    (tmp_path / "a-dir").mkdir()
    return tmp_path


def _cli(cli_command: list[str], args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*cli_command, *args], cwd=cwd, capture_output=True, text=True, timeout=300, **kwargs)


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("evo-subens: error: ")
    for needle in needles:
        assert needle in line, line
    return line


@pytest.mark.parametrize("args, needles", [
    (["name=../../escape-x"], ["config field 'name'", "one folder name", "'../../escape-x'"]),
    (["name=/abs/evo-subens-escape"], ["config field 'name'", "'/abs/evo-subens-escape'"]),
    (["name=nosuch/sub"], ["config field 'name'", "'nosuch/sub'"]),
    (["name=.."], ["config field 'name'"]),
    (["output_dir=a-file"], ["config field 'output_dir'", "a-file is a file"]),
    (["output_dir=a-file/runs"], ["config field 'output_dir'", "a-file is a file", "cannot be created"]),
    (["output_dir=/proc/evo-subens-x"], ["config field 'output_dir'", "cannot create folders in /proc"]),
    (["model.architecture=test_bad_input:ExplodingNet", "model.kwargs={}"],
     ["config field 'model.architecture'", "RuntimeError: width 4 needs a GPU here"]),
    (["data.name=fashion-mnist", "data.path=a-file"], ["data.path", "a-file is a file, not a folder"]),
])
def test_run_refuses_bad_places_and_classes(folder: Path, args: list[str], needles: list[str],
                                            capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing is created: no run directory inside or outside the folder. The command's code runs in this
    process (the engine's imports are paid once); exit code 2 with one line after the engine has loaded
    is checked through a real process by test_overrides_and_options_in_any_order."""
    before = _files(folder)
    monkeypatch.chdir(folder)
    code = cli.main(["run", "tiny.yaml", "workers.executor=local", *args])
    out, err = capsys.readouterr()
    _one_line_error(subprocess.CompletedProcess([], code, out, err), *needles)
    assert _files(folder) == before
    assert not (folder.parent.parent / "escape-x").exists() and not Path("/abs").exists()


@pytest.mark.parametrize("content, needles", [
    (os.urandom(64) + b"\xff\xfe", ["is not a text (UTF-8) file", "expected YAML"]),
    (b"- 1\n- 2\n", ["holds a list", "expected a mapping of sections"]),
    (b"just words\n", ["holds a string", "expected a mapping of sections"]),
], ids=["binary", "list", "string"])  # ids, not the random bytes: every xdist process collects the same tests
def test_config_files_that_are_not_configs(folder: Path, cli_command: list[str], content: bytes,
                                           needles: list[str]) -> None:
    (folder / "bad.yaml").write_bytes(content)
    _one_line_error(_cli(cli_command, ["run", "bad.yaml", "seed=1"], folder), "bad.yaml", *needles)


def test_paths_of_the_wrong_kind_say_what_they_are(folder: Path, capsys: pytest.CaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory as config, a file as run directory: 'is a directory' / 'is a file', not 'does not exist'."""
    monkeypatch.chdir(folder)
    for argv, needle in ((["run", "a-dir"], "config file a-dir is a directory; expected a YAML file"),
                         (["config", "a-dir"], "config file a-dir is a directory"),
                         (["resume", "a-file"], "run directory a-file is a file; expected a run's folder"),
                         (["grow", "a-file", "--members", "1"], "run directory a-file is a file")):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and "does not exist" not in err, err


@pytest.mark.slow
def test_report_on_broken_metrics(tmp_path: Path, cli_command: list[str]) -> None:
    result = run(tiny_dict(tmp_path, {"name": "r"}), progress=lambda line: None)
    (result.run_dir / "metrics.json").write_text('{"parent": {"accuracy": 0.9')  # cut short
    line = _one_line_error(_cli(cli_command, ["report", str(result.run_dir), "--no-features"], tmp_path),
                           "metrics.json is not valid JSON")
    assert f"evo-subens resume {result.run_dir}" in line


def test_user_class_that_raises_names_model_architecture() -> None:
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(architecture=f"{__name__}:ExplodingNet", kwargs={"width": 6}), (64,), 10)
    assert err.value.field == "model.architecture" and "width 6 needs a GPU here" in str(err.value)


@pytest.mark.slow
def test_overrides_and_options_in_any_order(folder: Path, cli_command: list[str]) -> None:
    """`run C --address H:P seed=1` parses; the address is used (refused here: nothing listens on it)."""
    proc = _cli(cli_command, ["run", "tiny.yaml", "--address", "127.0.0.1:9", "seed=1", "workers.executor=ray", "name=order"], folder)
    _one_line_error(proc, "workers.address", "127.0.0.1:9")
    assert not (folder / "runs").exists()
    assert cli.parse_args(cli.build_parser(), ["run", "c.yaml", "a=1", "--address", "h:1", "b=2"]).overrides == \
        ["a=1", "b=2"]
    with pytest.raises(SystemExit):
        cli.parse_args(cli.build_parser(), ["grow", "r", "--members", "1", "x=1"])  # grow takes no overrides


@pytest.mark.slow
def test_ctrl_c_says_where_the_run_stopped(folder: Path, cli_command: list[str]) -> None:
    """SIGINT to the run's process group (what a terminal's Ctrl-C does) during the search: exit 130,
    one line with the generation reached and the resume command, which then finishes the run (told to
    stop the search at the generation reached: the 40 generations only keep the search running until the
    interrupt arrives)."""
    args = ["run", "tiny.yaml", "name=stopped", "workers.executor=local", "search.generations=40",
            "search.population=64"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # A shell's background job starts with SIGINT ignored, and Python keeps an inherited SIG_IGN: give the
    # run the default disposition a terminal's foreground process has, whatever started this test.
    proc = subprocess.Popen([*cli_command, *args], cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    errors = Lines(proc.stderr)
    try:
        Lines(proc.stdout, beside=errors).until("[search] generation 1 (2 of 40)")
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
        err = errors.rest(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    [line] = err.strip().splitlines()
    run_dir = Path("runs") / "stopped"
    assert line.startswith(f"evo-subens: interrupted; {run_dir} stopped after generation ")
    assert line.endswith(f" of 40); go on with: evo-subens resume {run_dir}")
    reached = int(line.split(" stopped after generation ")[1].split()[0]) + 1  # the log index; + 1: done
    assert reached >= 2
    resumed = _cli(cli_command, ["resume", str(run_dir), f"search.generations={reached}"], folder)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (folder / run_dir / "metrics.json").is_file()
