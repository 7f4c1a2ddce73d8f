"""Progress output: piped, one plain line per step as it happens; on a terminal, bars with the time left;
the closing '(Ns)' is the wall time of the command."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest

from evo_subens.core.progress import Steps, process_age, say
from run_output import Lines

ARGS = ["tiny.yaml", "workers.executor=local", "parent.epochs=3"]


@pytest.mark.slow
def test_piped_run_prints_each_step_when_it_happens(tmp_path: Path, tiny_yaml_text: str,
                                                     cli_command: list[str]) -> None:
    """No bar characters when piped; lines arrive while the run works (flushed, not at exit); every stage
    that takes time says so; the closing (Ns) is the command's wall time."""
    (tmp_path / "tiny.yaml").write_text(tiny_yaml_text)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    run_dir = tmp_path / "runs" / "piped"
    started = time.monotonic()
    proc = subprocess.Popen([*cli_command, "run", *ARGS, "name=piped"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    # What the run had written when each line arrived: a line held back until exit would arrive after
    # the run directory's last file (metrics.json) exists.
    errors, arrivals = Lines(proc.stderr), []
    for line in iter(Lines(proc.stdout).next_line, None):
        arrivals.append((time.monotonic(), line.rstrip("\n"), (run_dir / "metrics.json").exists()))
    proc.wait(timeout=60)
    assert proc.returncode == 0, errors.rest(timeout=30)[-3000:]
    lines = [line for _, line, _ in arrivals]
    assert not any("\r" in line or " left" in line for line in lines)
    assert lines[:2] == ["[run] tiny.yaml: checking the config", "[run] tiny.yaml: config valid; loading the engine"]
    assert not arrivals[0][2]  # the first line did not wait for the end...
    assert arrivals[-1][2]  # ...which the last line reports, after metrics.json is written
    for prefix in ("[data] loading digits", "[parent] epoch 3/3", "[search] generation 1 (2 of 2)", "[members] choosing",
                   "[test] parent, 3 members"):
        assert any(line.startswith(prefix) for line in lines), prefix
    seconds = int(re.fullmatch(r"\[run\] results in .* \((\d+)s\)", lines[-1]).group(1))
    # Counted from the process's start (imports included), which was after `started`; the count covers
    # at least the time between the first line and the last (both printed after the process started).
    first, last = arrivals[0][0], arrivals[-1][0]
    assert last - first - 2 <= seconds <= last - started + 1, (seconds, first - started, last - started)


def _read_pty(fd: int, proc: subprocess.Popen, timeout: float) -> str:
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_terminal_run_shows_bars_with_time_left(tmp_path: Path, tiny_yaml_text: str,
                                                cli_command: list[str]) -> None:
    """On a terminal the parent's epochs and the generations get a bar with the time left; the step lines
    are printed as when piped."""
    (tmp_path / "tiny.yaml").write_text(tiny_yaml_text)
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen([*cli_command, "run", *ARGS, "name=tty"], cwd=tmp_path, stdin=subprocess.DEVNULL,
                            stdout=follower, stderr=follower)
    os.close(follower)
    try:
        output = _read_pty(leader, proc, 300)
        proc.wait(timeout=60)
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert re.search(r"\[parent\] 1/3 epochs \|.*\| [\d:]+<[\d:]+ left", output), output[-3000:]
    assert re.search(r"\[search\] 1/2 generations \|.*\| [\d:]+<[\d:]+ left", output), output[-3000:]
    assert "[parent] epoch 3/3" in output and "[run] results in" in output


def test_steps_report_lines_to_any_callable_without_a_bar() -> None:
    lines: list[str] = []
    with Steps(lines.append, 2, "[x]", "things") as steps:
        assert steps.bar is None
        steps.step("first")
        steps.step()
        steps.step("second")
    assert lines == ["first", "second"]
    assert say is not print and 0 < process_age() < 3600
