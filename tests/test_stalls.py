"""The stall watch on its own, with small actors of the session's Ray: it ends an actor that answered and
then went silent, leaves alone one that is still starting, and survives errors of its own."""

from __future__ import annotations

import os
import signal
import time

import pytest

from evo_subens.core.stalls import StallWatch

pytestmark = [pytest.mark.ray, pytest.mark.slow]


class _Problem:
    """What the watch reads of a SubnetworkProblem: its actors and the processes (and nodes) seen."""

    def __init__(self, actors: list, fail_first: int = 0):
        self._actors, self._nodes, self.fail_first = actors, {}, fail_first

    def seen_processes(self) -> dict:
        return dict(self._nodes)

    @property
    def actors(self) -> list:
        if self.fail_first:
            self.fail_first -= 1
            raise RuntimeError("the actors are being replaced")
        return self._actors


def _starting_actor(ray, start_s: float):
    @ray.remote(num_cpus=0, max_concurrency=2, max_restarts=-1, max_task_retries=-1)
    class Starting:
        def __init__(self, delay: float):
            time.sleep(delay)  # importing torch and fetching a payload, on a loaded machine

        def call(self, name: str, args: list, kwargs: dict) -> int:
            return os.getpid()

    return Starting.remote(start_s)


def _clean_up(ray, watch: StallWatch, actor, pid: int | None) -> None:
    """Stop the watch, and end the actor and its stopped process (if the test got that far)."""
    watch.stop()
    if pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    ray.kill(actor)


def _wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)
    return condition()


def test_an_actor_still_starting_is_left_alone_and_a_stopped_one_is_ended(ray_session) -> None:
    """Timeout 1 s: an actor whose start takes 3 s is not ended for its silence while it starts; once it
    has answered, SIGSTOP makes it silent and the watch ends it (once), and Ray starts it again."""
    ray = ray_session
    actor = _starting_actor(ray, 3.0)
    lines: list[str] = []
    watch, pid = StallWatch(_Problem([actor]), timeout=1.0, progress=lines.append, interval=0.3).start(), None
    try:
        pid = ray.get(actor.call.remote("alive", [], {}), timeout=60)
        assert _wait_for(lambda: 0 in watch.answering, 10)
        assert watch.ended == [] and lines == []  # 3 s of silence while starting: not a stall
        os.kill(pid, signal.SIGSTOP)
        assert _wait_for(lambda: watch.ended, 10), lines
        assert lines == ["[workers] actor-0 has not answered for 1 s (stopped or stuck): ending it, so that Ray "
                         "starts it again and retries its unfinished work"]
        assert ray.get(actor.call.remote("alive", [], {}), timeout=60) != pid  # a new process answers
        assert len(watch.ended) == 1  # the new process's start was not taken for a stall
    finally:
        _clean_up(ray, watch, actor, pid)


def test_the_watch_reports_its_own_errors_and_goes_on(ray_session) -> None:
    """An error inside a check (here: the actors being read while replaced) is one progress line, and the
    next check runs: a watch that died would leave a stopped actor waited on forever."""
    ray = ray_session
    actor = _starting_actor(ray, 0.0)
    lines: list[str] = []
    problem = _Problem([actor], fail_first=1)
    watch, pid = StallWatch(problem, timeout=1.0, progress=lines.append, interval=0.2).start(), None
    try:
        pid = ray.get(actor.call.remote("alive", [], {}), timeout=60)
        assert _wait_for(lambda: 0 in watch.answering, 10)  # pinged after the failed check
        assert lines == ["[workers] stall watch: RuntimeError: the actors are being replaced; checking again in "
                         "0.2 s"]
        os.kill(pid, signal.SIGSTOP)
        assert _wait_for(lambda: watch.ended, 10), lines  # still watching
    finally:
        _clean_up(ray, watch, actor, pid)


def test_an_actor_stopped_before_its_first_ping_is_ended_once_its_results_were_read(ray_session) -> None:
    """An actor can start, return a generation's scores and be stopped before the watch's first ping reaches
    it: the scores the driver read (its node recorded under its pid) count as an answer, so it is ended,
    not taken for one still starting and waited on forever."""
    ray = ray_session
    actor = _starting_actor(ray, 0.0)
    lines: list[str] = []
    problem, watch, pid = _Problem([actor]), None, None
    try:
        pid = ray.get(actor.call.remote("node_id", [], {}), timeout=60)
        # as SubnetworkProblem.worker_node records the node of a process whose results the driver read
        problem._nodes[(0, pid)] = (ray.get_runtime_context().get_node_id(), "127.0.0.1")
        os.kill(pid, signal.SIGSTOP)
        watch = StallWatch(problem, timeout=1.0, progress=lines.append, interval=0.3).start()
        assert _wait_for(lambda: watch.ended, 10), lines
        assert ray.get(actor.call.remote("alive", [], {}), timeout=60) != pid  # a new process answers
        time.sleep(2.0)  # several timeouts: the ended process's record does not make the new one a target
        assert len(watch.ended) == 1, lines
    finally:
        if watch is not None:
            _clean_up(ray, watch, actor, pid)
