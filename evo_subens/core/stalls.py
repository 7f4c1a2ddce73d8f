"""Actors that stop answering: found by a ping that a busy actor answers and a stopped or stuck one cannot,
then ended so that Ray starts them again and retries their unfinished work.

Ray restarts an actor whose process dies, but not one whose process is alive and silent (stopped with
SIGSTOP, deadlocked, swapped out for good): a search would wait on it forever. Each actor has a second
call slot (``max_concurrency=2``; the driver sends it one piece of work at a time), so a ping answers
within milliseconds while the first slot works. An actor the driver has heard from since it (re)started (a
ping answered, or evaluation results it returned) that then leaves ``timeout`` seconds of pings unanswered,
on a node Ray still counts as alive (a lost node's actors are Ray's to restart), is killed with
``ray.kill(no_restart=False)``: Ray restarts it, the new process
fetches the payload again and the retried work gives the same results, since a candidate's score does not
depend on the process. An error in the watch itself is reported and the watch goes on: a watch that died
would leave the search waiting on a stopped actor forever.
"""

from __future__ import annotations

import time
from typing import Callable

import ray

from .problem import SubnetworkProblem
from .watch import Watch


class StallWatch(Watch):
    """Pings every actor of ``problem`` each ``interval`` seconds; ends those silent for ``timeout``."""

    def __init__(self, problem: SubnetworkProblem, timeout: float, progress: Callable[[str], None],
                 interval: float | None = None):
        self.problem, self.timeout, self.progress = problem, timeout, progress
        self.interval = interval if interval is not None else min(5.0, timeout / 2)
        self.ended: list[dict] = []  # {"worker": i, "pid": pid, "silent_s": timeout} per actor process ended
        # actor index -> the pid of its process the driver heard from since it (re)started: only these are ended
        self.answering: dict[int, int] = {}
        super().__init__("evo-subens-stall-watch")

    def watch(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self._check()
            except Exception as exc:  # noqa: BLE001 - a dead watch would leave a stopped actor waited on forever
                self.progress(f"[workers] stall watch: {type(exc).__name__}: {exc}; checking again in "
                              f"{self.interval:g} s")

    def _check(self) -> None:
        """Ping every actor; end those heard from before that now leave ``timeout`` seconds unanswered.

        An actor not heard from since it (re)started is still starting: importing torch and fetching the
        payload can take longer than ``timeout`` on a loaded machine, and ending it then would only start it
        again, so it is left to Ray until it answers. Evaluation results count as an answer: an actor can
        start, score a generation and be stopped between two pings, and would otherwise never be ended."""
        actors = self.problem.actors
        if not actors:
            return
        pings = {actor.call.remote("alive", [], {}): i for i, actor in enumerate(actors)}
        silent = self._unanswered(list(pings))
        if self.stopped.is_set():
            return
        answering, seen = self.answering, self.problem.seen_processes()
        answered = [ping for ping in pings if ping not in silent]
        answering.update({pings[ping]: pid for ping, pid in zip(answered, ray.get(answered))})
        ended = {(entry["worker"], entry["pid"]) for entry in self.ended}
        for worker, pid in seen:  # processes whose results the driver has read
            if (worker, pid) not in ended:
                answering.setdefault(worker, pid)
        live_nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
        for ping in silent:
            i, node = pings[ping], self._node_of(pings[ping], seen)
            if i not in answering or (node is not None and node not in live_nodes):
                continue
            self.ended.append({"worker": i, "pid": answering.pop(i), "silent_s": self.timeout})
            self.progress(f"[workers] actor-{i} has not answered for {self.timeout:g} s (stopped or stuck): "
                          f"ending it, so that Ray starts it again and retries its unfinished work")
            ray.kill(actors[i], no_restart=False)

    def _unanswered(self, pings: list) -> list:
        """The pings still unanswered after ``timeout`` seconds (or once the watch is stopped), waited for
        in slices of at most a second so that :meth:`stop` never waits for a whole timeout."""
        deadline = time.monotonic() + self.timeout
        while pings and not self.stopped.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            _, pings = ray.wait(pings, num_returns=len(pings), timeout=min(1.0, left))
        return pings

    @staticmethod
    def _node_of(worker: int, seen: dict[tuple[int, int], tuple[str, str]]) -> str | None:
        """The Ray node the actor was last seen on (its newest process the driver asked about)."""
        nodes = [node for (w, _), (node, _) in seen.items() if w == worker]
        return nodes[-1] if nodes else None
