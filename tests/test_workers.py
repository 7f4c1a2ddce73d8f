"""Lost workers: an actor process killed mid-generation is restarted by Ray and its candidates are
evaluated again; the generation completes with every candidate exactly once and the incident logged."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from conftest import deep_merge, TINY

from evo_subens.core.config import WorkersConfig, config_from_dict
from evo_subens.families import make_family
from evo_subens.core.problem import make_problem
from evo_subens.core.search import SubnetworkSearch

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def hold_first_evaluation(gate: str):
    """A remote hook for the actors (EvoTorch runs it in every actor process it starts, restarts included):
    once ``<gate>/armed`` exists, the first actor process to start evaluating a batch writes
    ``<gate>/entered`` ("<actor index> <pid>") and holds there until it is killed; every other process,
    the restarted one included, evaluates as usual. The generation then cannot end before the kill.

    Returned as a closure so Ray pickles it by value (the actors cannot import this test module)."""

    def hook(problem) -> None:
        evaluate = problem._evaluate_batch

        def gated(batch) -> None:
            if os.path.exists(os.path.join(gate, "armed")):
                try:
                    fd = os.open(os.path.join(gate, "entered"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    pass
                else:
                    os.write(fd, f"{problem.actor_index} {os.getpid()}".encode())
                    os.close(fd)
                    deadline = time.monotonic() + 300
                    while time.monotonic() < deadline:  # killed here by the test
                        time.sleep(0.05)
                    raise RuntimeError("held actor was never killed")
            evaluate(batch)

        problem._evaluate_batch = gated

    return hook


def _wait_for(path: Path, step: threading.Thread, timeout: float = 120) -> str:
    """The text of ``path`` once it is written (the step must still be running meanwhile)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        assert step.is_alive(), "the generation ended without an actor entering the gate"
        time.sleep(0.05)
    raise AssertionError(f"no actor entered the gate within {timeout} s")


def test_actor_killed_mid_generation_is_replaced(ray_session, tmp_path: Path) -> None:
    from test_search import payload_and_genomes

    cfg = config_from_dict(deep_merge(TINY, {"output_dir": str(tmp_path), "search": {"population": 8}}))
    payload, _ = payload_and_genomes(cfg, 1)
    gate = tmp_path / "gate"
    gate.mkdir()
    problem = make_problem(WorkersConfig(num_actors=2, subbatch_size=4), payload, fitness="accuracy",
                           population=cfg.search.population)
    problem.remote_hook.append(hold_first_evaluation(str(gate)))
    search = SubnetworkSearch(problem, make_family(cfg.children), cfg.search, seed=0)
    try:
        search.step()
        assert set(search.worker_pids) == {0, 1}  # both actors evaluated generation 0
        (gate / "armed").touch()
        step = threading.Thread(target=search.step)
        step.start()
        victim, victim_pid = (int(v) for v in _wait_for(gate / "entered", step).split())
        assert search.worker_pids[victim] == victim_pid  # the gate holds an actor of generation 0
        assert step.is_alive()  # held by the gate: the generation cannot have ended
        os.kill(victim_pid, signal.SIGKILL)
        step.join(timeout=120)
        assert not step.is_alive()
    finally:
        problem.close()
    ids = [r.candidate for r in search.records]
    assert ids == list(range(2 * cfg.search.population))  # every candidate once, none lost or doubled
    assert all(r.generation == 1 for r in search.records[cfg.search.population:])
    assert search.incidents and search.incidents[0]["worker"] == victim
    assert search.incidents[0]["lost_pid"] == victim_pid and search.incidents[0]["new_pid"] != victim_pid
    assert search.incidents[0]["generation"] == 1
