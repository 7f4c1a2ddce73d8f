"""Throughput benchmark: the engine's candidate evaluation against the forward-pass limit.

In one run, on the same validation images, the same models and the same number of Ray actors (one torch
thread each, the same malloc settings):

(a) the engine: a :class:`~evo_subens.problem.SubnetworkProblem` evaluates a population of noisy
    children (genomes in, metrics out);
(b) the limit: actors holding the same evaluator run plain validation passes of the parent, one per
    candidate, with the same batching and metric computation.

The two are timed in alternation, ``repeats`` times each after a warm-up, and the median rates are
compared: a/b near 1 means materialising children costs next to nothing beside the forward pass.
"""

from __future__ import annotations

import math
import os
import pickle
import resource
import statistics
import time

import numpy as np
import ray
import torch

from ..config import ChildrenConfig, DataConfig, ModelConfig, WorkersConfig
from ..data import load_dataset
from ..evaluation import CandidateEvaluator, EvaluationPayload, parent_fingerprint, torch_threads, worker_device
from ..families import make_family
from ..models import build_model, count_parameters, state_copy
from ..problem import ACTOR_ENV, actor_options, make_problem

BENCH_MODELS = {
    "cnn": ModelConfig(name="cnn2d"),  # ~0.1M parameters on 28x28 images
    "mlp10m": ModelConfig(name="mlp", kwargs={"hidden": [2048, 2048, 2048]}),  # ~10M parameters
}


@ray.remote
class ForwardPassActor:
    """Holds the parent and the validation data like an evaluation actor; runs plain validation passes."""

    def __init__(self, payload: EvaluationPayload):
        torch.set_num_threads(payload.threads)
        self.evaluator = CandidateEvaluator(payload, worker_device(payload))

    def device(self) -> str:
        return str(self.evaluator.device)

    def passes(self, count: int) -> int:
        # The same thread setting, in the executing thread, as the engine's evaluation uses.
        with torch_threads(self.evaluator.payload.threads):
            for _ in range(count):
                self.evaluator.score_current()
        return count


def _payload(model_cfg: ModelConfig, data, children: ChildrenConfig, use_gpu: bool) -> EvaluationPayload:
    torch.manual_seed(0)
    model = build_model(model_cfg, data.input_shape, data.num_classes)
    state = state_copy(model)
    return EvaluationPayload(model=model_cfg, input_shape=data.input_shape, num_classes=data.num_classes,
                             parent_state=state, parent_id=parent_fingerprint(state), children=children,
                             val_x=data.validation.x, val_y=data.validation.y, batch_size=1000, threads=1,
                             use_gpu=use_gpu)


def _time(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _measure_model(name: str, data, *, population: int, actors: int, density: float, repeats: int,
                   gpus_per_actor: float) -> dict:
    children = ChildrenConfig(density=density, sigma=0.1)
    payload = _payload(BENCH_MODELS[name], data, children, use_gpu=gpus_per_actor > 0)
    family = make_family(children)
    rng = np.random.default_rng(0)
    root = family.root(payload.parent_id)

    def genomes() -> list[str]:
        return [g for _, g in family.propose([root], population, rng)]

    # Both actor sets are alive at once (they run in turn), so each asks for half its GPU share.
    workers = WorkersConfig(num_actors=actors, threads_per_actor=1, num_gpus_per_actor=gpus_per_actor / 2)
    problem = make_problem(workers, payload, fitness="accuracy", population=population)
    payload_ref = ray.put(payload)
    forward_actors = [ForwardPassActor.options(num_gpus=gpus_per_actor / 2, **actor_options(workers))
                      .remote(payload_ref) for _ in range(actors)]
    shares = [population // actors + (i < population % actors) for i in range(actors)]

    def limit() -> None:
        ray.get([a.passes.remote(n) for a, n in zip(forward_actors, shares)])

    def engine() -> None:
        problem.evaluate(problem.make_batch(genomes()))

    try:
        limit_devices = ray.get([a.device.remote() for a in forward_actors])
        engine()  # warm-up: actor start-up and payload transfer are excluded from both rates
        limit()
        devices = sorted(set(problem.worker_devices() + limit_devices))
        engine_times, limit_times = [], []
        for _ in range(repeats):
            engine_times.append(_time(engine))
            limit_times.append(_time(limit))
        sample = genomes()
        subbatch = workers.subbatch_size or max(1, math.ceil(population / (2 * actors)))
        piece_bytes = len(pickle.dumps(problem.make_batch(sample[:subbatch])))
    finally:
        problem.close()
        for actor in forward_actors:
            ray.kill(actor)
    engine_rate = population / statistics.median(engine_times)
    limit_rate = population / statistics.median(limit_times)
    return {"model": name, "params": count_parameters(build_model(payload.model, data.input_shape,
                                                                  data.num_classes)),
            "actors": actors, "devices": ",".join(devices), "engine": engine_rate, "limit": limit_rate, "ratio": engine_rate / limit_rate,
            "bytes_per_candidate": piece_bytes / subbatch}


def throughput(*, models: list[str], population: int = 32, actors: int = 2, density: float = 0.01,
               validation_size: int = 5000, repeats: int = 3, data_root: str | None = None,
               gpus_per_actor: float = 0.0) -> list[dict]:
    """Run the benchmark and print a table; returns its rows."""
    unknown = [m for m in models if m not in BENCH_MODELS]
    if unknown:
        raise SystemExit(f"evo-subens bench: unknown model(s) {unknown}; choose from {sorted(BENCH_MODELS)}")
    data = load_dataset(DataConfig(name="fashion-mnist", root=data_root, validation_size=validation_size))
    if not ray.is_initialized():
        # Both actor sets exist at once but run in turn: reserve logical CPUs for both.
        ray.init(num_cpus=max(os.cpu_count() or 1, 2 * actors), include_dashboard=False,
                 runtime_env={"env_vars": ACTOR_ENV})
    print(f"throughput: Fashion-MNIST, {len(data.validation)} validation images, population {population}, "
          f"density {density}, {actors} actors x 1 thread, median of {repeats}")
    header = (f"{'model':<8}{'params':>12}{'actors':>8}{'device':>8}{'engine cand/s':>15}{'forward cand/s':>16}"
              f"{'ratio a/b':>11}{'bytes/cand':>12}")
    print(header)
    rows = []
    for name in models:
        row = _measure_model(name, data, population=population, actors=actors, density=density,
                             repeats=repeats, gpus_per_actor=gpus_per_actor)
        rows.append(row)
        print(f"{row['model']:<8}{row['params']:>12,}{row['actors']:>8}{row['devices']:>8}{row['engine']:>15.2f}"
              f"{row['limit']:>16.2f}{row['ratio']:>11.3f}{row['bytes_per_candidate']:>12.0f}", flush=True)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"driver peak RSS: {peak_mb:.0f} MB")
    return rows
