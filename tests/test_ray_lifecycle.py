"""A local Ray the CLI starts itself: checked before any work, quiet about what is expected, and gone
with its driver, even when the driver is SIGKILLed mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from evo_subens.core.reaper import descendants, session_processes
from run_output import Lines

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # each test's CLI process starts a Ray of its own


def _alive(recorded: dict[int, int]) -> dict[int, str]:
    """pid -> command line of the recorded processes still running (same start time: not a reused pid)."""
    alive = {}
    for pid, started in recorded.items():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(stat[19]) == started and stat[0] != "Z":
            alive[pid] = cmdline[:100]
    return alive


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_sigkilled_driver_leaves_no_ray_process(tmp_path: Path, tiny_yaml_text: str, cli_command: list[str]) -> None:
    """SIGKILL the driver of a Ray run inside its search: within a few seconds no process of that run's
    Ray is left. Before the kill the run said, in its own words, that token authentication is on, and Ray
    printed neither its token warning nor its error about actor arguments in the object store."""
    (tmp_path / "tiny.yaml").write_text(tiny_yaml_text)
    args = ["run", "tiny.yaml", "name=killed", "workers.executor=ray", "workers.num_actors=2",
            "search.generations=200", "search.population=8"]  # 200: the search is still running when killed
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([*cli_command, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    err = Lines(proc.stderr)
    out = Lines(proc.stdout, beside=err)
    recorded: dict[int, int] = {}
    try:
        lines = out.until("[search] generation 1 (2 of")
        recorded = descendants(proc.pid)
        commands = " ".join(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                            for pid in recorded if Path(f"/proc/{pid}/cmdline").exists())
        assert "raylet" in commands and "gcs_server" in commands  # the run started a Ray of its own
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _alive(recorded) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _alive(recorded) == {}
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in recorded:  # leave nothing behind even when the check failed
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    err = err.rest(timeout=60)
    assert any(line.startswith("[workers] Ray is up, token authentication on") for line in lines), "".join(lines)
    assert "Token authentication is enabled" not in err
    assert "constructor arguments in the object store" not in err
    assert "Traceback" not in err


def _started_ticks(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
@pytest.mark.parametrize("delay", [0.3, 1.5, 3.0])
def test_driver_killed_while_ray_starts_leaves_nothing(tmp_path: Path, tiny_yaml_text: str, cli_command: list[str],
                                                       delay: float) -> None:
    """SIGKILL the driver ``delay`` seconds after it says it is starting Ray (ray.init takes a few): within
    30 s nothing of that Ray is left, neither a process the driver had started by then nor one Ray started
    afterwards (its agents, which outlive the raylet that spawns them)."""
    (tmp_path / "tiny.yaml").write_text(tiny_yaml_text)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([*cli_command, "run", "tiny.yaml", "name=early", "workers.executor=ray"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                            start_new_session=True)
    started = _started_ticks(proc.pid)
    recorded: dict[int, int] = {}
    try:
        Lines(proc.stdout).until("[workers] starting Ray on this machine")
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline:  # what the driver has started by the kill, as closely as we can
            recorded.update(descendants(proc.pid))
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while (_alive(recorded) or session_processes(proc.pid, started)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _alive(recorded) == {} and session_processes(proc.pid, started) == {}
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in {**recorded, **session_processes(proc.pid, started)}:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def test_unplaceable_actors_stop_the_run_before_training(tmp_path: Path, tiny_yaml_text: str,
                                                         cli_command: list[str]) -> None:
    """More actors than the machine's CPUs: exit 2 naming workers.num_actors, before the parent trains and before the
    run directory exists."""
    (tmp_path / "tiny.yaml").write_text(tiny_yaml_text)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([*cli_command, "run", "tiny.yaml", "name=many", "workers.executor=ray",
                           "workers.num_actors=100000"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "config field 'workers.num_actors'" in proc.stderr and "Traceback" not in proc.stderr
    assert "[parent]" not in proc.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_stopped_actor_is_replaced_and_its_work_redone(tmp_path: Path, tiny_yaml_text: str,
                                                       cli_command: list[str]) -> None:
    """SIGSTOP one evaluation actor mid-search: within workers.stall_timeout (+ a ping interval) the run says
    so, ends it, Ray starts it again, and the run ends with the same population log, members and metrics as
    an uninterrupted in-process run."""
    from test_resume import _assert_same_run

    (tmp_path / "tiny.yaml").write_text(tiny_yaml_text)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    args = ["run", "tiny.yaml", "search.generations=60", "workers.num_actors=2"]
    reference = subprocess.run([*cli_command, *args, "name=straight", "workers.executor=local"], cwd=tmp_path,
                               env=env, capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]
    proc = subprocess.Popen([*cli_command, *args, "name=stopped", "workers.executor=ray", "workers.stall_timeout=3"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(env, PYTHONUNBUFFERED="1"), start_new_session=True)
    err = Lines(proc.stderr)
    out = Lines(proc.stdout, beside=err)
    victim, recorded = None, {}
    try:
        lines = out.until("[search] generation 1 (2 of")
        actors = [pid for pid in descendants(proc.pid)
                  if b"EvaluationActor" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(actors) == 2, "".join(lines)[-3000:]
        victim = actors[0]
        recorded = descendants(proc.pid)
        os.kill(victim, signal.SIGSTOP)
        stopped = time.monotonic()
        out.until("[workers] actor-")
        print(f"stall reported {time.monotonic() - stopped:.1f} s after SIGSTOP")
        assert proc.wait(timeout=300) == 0, err.rest(timeout=60)[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        if victim is not None:
            try:
                os.kill(victim, signal.SIGKILL)
            except OSError:
                pass
    deadline = time.monotonic() + 30
    while _alive(recorded) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _alive(recorded) == {}  # nothing the run started survives it, the stopped actor included
    out = out.rest(timeout=60)
    assert "has not answered for 3 s (stopped or stuck)" in out, out[-3000:]
    assert f"was lost (pid {victim}) and restarted" in out, out[-3000:]
    _assert_same_run(tmp_path / "runs" / "stopped", tmp_path / "runs" / "straight")
