"""Lost workers: an actor process killed mid-generation is restarted by Ray and its candidates are
evaluated again; the generation completes with every candidate exactly once and the incident logged."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from conftest import deep_merge, TINY

from evo_subens.core.config import WorkersConfig, config_from_dict
from evo_subens.tasks.classification.data import load_dataset
from evo_subens.core.worker import parent_fingerprint
from evo_subens.tasks.classification.evaluation import EvaluationPayload
from evo_subens.families import make_family
from evo_subens.tasks.classification.models import build_model
from evo_subens.core.problem import make_problem
from evo_subens.core.search import SubnetworkSearch


def _slow_payload(tmp_path: Path) -> tuple:
    """A payload whose candidates take ~10 ms each in one thread, so a generation of 160 lasts ~1 s."""
    cfg = config_from_dict(deep_merge(TINY, {"output_dir": str(tmp_path), "data": {"name": "mnist1d",
                                             "num_samples": 5000, "validation_size": 2000},
                                             "model": {"name": "cnn1d", "kwargs": {"hidden": 64}},
                                             "search": {"population": 160, "generations": 2, "elites": 4}}))
    data = load_dataset(cfg.data)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    payload = EvaluationPayload(model=cfg.model, input_shape=data.input_shape, num_classes=data.num_classes,
                                parent_state=state, parent_id=parent_fingerprint(state), children=cfg.children,
                                val_x=data.validation.x, val_y=data.validation.y, batch_size=500, threads=1)
    return cfg, payload


def test_actor_killed_mid_generation_is_replaced(ray_session, tmp_path: Path) -> None:
    cfg, payload = _slow_payload(tmp_path)
    problem = make_problem(WorkersConfig(num_actors=2, subbatch_size=4), payload, fitness="accuracy",
                           population=cfg.search.population)
    search = SubnetworkSearch(problem, make_family(cfg.children), cfg.search, seed=0)
    try:
        search.step()
        victim, victim_pid = 1, search.worker_pids[1]
        started = time.perf_counter()
        step = threading.Thread(target=search.step)
        step.start()
        time.sleep(0.3)
        assert step.is_alive(), "the generation ended before the kill; make candidates slower"
        os.kill(victim_pid, signal.SIGKILL)
        step.join(timeout=120)
        assert not step.is_alive()
        assert time.perf_counter() - started > 0.3
    finally:
        problem.close()
    ids = [r.candidate for r in search.records]
    assert ids == list(range(2 * cfg.search.population))  # every candidate once, none lost or doubled
    assert all(r.generation == 1 for r in search.records[cfg.search.population:])
    assert search.incidents and search.incidents[0]["worker"] == victim
    assert search.incidents[0]["lost_pid"] == victim_pid and search.incidents[0]["new_pid"] != victim_pid
    assert search.incidents[0]["generation"] == 1
