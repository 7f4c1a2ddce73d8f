"""Ends the processes of a local Ray when the driver that started it dies, however it dies.

Ray ties the processes the driver starts directly (GCS, raylet, dashboard, monitors) to the driver's
life, but not their children: after a SIGKILL of the driver, Ray's dashboard agent, runtime-env agent
and idle workers were seen to live on. :func:`start` launches this file as a small separate process (the
standard library only, so it starts in milliseconds) that records the driver's descendants every half
second and, once the driver is gone, terminates the ones it recorded. It learns of the driver's death
from a pipe whose only writer is the driver: the kernel closes it when the driver exits, SIGKILL
included, so no pid is polled and a reused pid cannot fool it.

It starts before ``ray.init`` and also ends what it never saw: a driver killed while Ray starts dies
before the half-second scan finds Ray's agents, which the raylet spawns late and which outlive it. Ray
names the session folder of a Ray it starts after the starting process
(``session_<date>_<time>_<us>_<driver pid>``), and every process of that Ray names the folder in its
command line or, for those that rename themselves (``ray::DashboardAgent``), holds its log files open in
it; processes started after the reaper that do so are that Ray's, whoever their parent is now. A cluster
the driver only joins has other session folders and is never touched.

Linux only (it reads ``/proc``); elsewhere :func:`start` does nothing.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

PROC = Path("/proc")
POLL_S = 0.5
TERM_GRACE_S = 3.0

_writer: list[int] = []  # the driver's end of the pipe, open for the driver's whole life
_process: list[subprocess.Popen] = []


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of ``pid``, None when it is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
    return int(fields[1]), int(fields[19])


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time) of every process."""
    table = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                table[int(entry.name)] = stat
    return table


def descendants(root: int, table: dict[int, tuple[int, int]] | None = None) -> dict[int, int]:
    """pid -> start time of every live descendant of ``root`` (not ``root`` itself)."""
    table = _processes() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found[pid] = table[pid][1]
        todo.extend(children.get(pid, []))
    return found


def mentions(pid: int, folder: re.Pattern) -> bool:
    """Whether ``pid``'s command line names ``folder``, or, for a process that renamed itself ``ray::...``,
    one of its open files lies in it."""
    try:
        command = (PROC / str(pid) / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    if folder.search(command):
        return True
    if not command.startswith("ray::"):
        return False
    try:
        fds = os.listdir(PROC / str(pid) / "fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if folder.search(os.readlink(PROC / str(pid) / "fd" / fd)):
                return True
        except OSError:
            continue
    return False


def session_processes(driver: int, since: int, table: dict[int, tuple[int, int]] | None = None) -> dict[int, int]:
    """pid -> start time of the processes of the Ray that ``driver`` started: started at or after ``since``
    (clock ticks since boot) and naming its session folder (see the module docstring)."""
    folder = re.compile(rf"session_\d{{4}}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_{driver}(?!\d)")
    table = _processes() if table is None else table
    return {pid: started for pid, (_, started) in table.items()
            if started >= since and pid != os.getpid() and mentions(pid, folder)}


def _alive(recorded: dict[int, int]) -> list[int]:
    """The recorded processes that still run (same pid and start time: not a reused pid)."""
    return [pid for pid, started in recorded.items() if (_stat(pid) or (0, -1))[1] == started]


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def watch(driver: int, pipe: int) -> None:
    """Record ``driver``'s descendants until ``pipe`` reaches end of file, then end the survivors."""
    me = os.getpid()
    since = (_stat(me) or (0, 0))[1]
    recorded: dict[int, int] = {}
    while True:
        ready, _, _ = select.select([pipe], [], [], POLL_S)
        if ready and not os.read(pipe, 1):
            break  # every writer is gone: the driver exited
        recorded.update(descendants(driver))
        recorded.pop(me, None)
    # Orphans of recorded processes (e.g. a worker whose raylet just died) now hang off init: follow the
    # recorded ones still alive to their own children too.
    table = _processes()
    for pid in _alive(recorded):
        recorded.update(descendants(pid, table))
    recorded.update(session_processes(driver, since, table))
    recorded.pop(me, None)
    _signal_all(_alive(recorded), signal.SIGTERM)
    deadline = time.monotonic() + TERM_GRACE_S
    while _alive(recorded) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal_all(_alive(recorded), signal.SIGKILL)


def start() -> None:
    """Start the reaper for this process (once; Linux only)."""
    if _writer or not PROC.is_dir() or not sys.platform.startswith("linux"):
        return
    read_end, write_end = os.pipe()  # not inheritable: Ray's processes never hold the writer
    _process.append(subprocess.Popen(
        [sys.executable, "-I", str(Path(__file__).resolve()), str(os.getpid()), str(read_end)],
        pass_fds=(read_end,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True))  # its own session: a terminal's Ctrl-C does not reach it
    os.close(read_end)
    _writer.append(write_end)


if __name__ == "__main__":
    watch(int(sys.argv[1]), int(sys.argv[2]))
