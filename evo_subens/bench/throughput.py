"""Throughput benchmark: the engine's candidate evaluation against the forward-pass limit and stock EvoTorch.

In one run, on the same validation images and the same models, for each actor count in ``actors`` (Ray
actors of one torch thread each, the same malloc settings), every method evaluates ``population``
candidates per generation:

``limit``
    Actors holding the same evaluator run plain validation passes of the parent, one per candidate, with
    the same batching and metric computation: the most any method can reach without skipping work.
``engine``
    A :class:`~evo_subens.core.problem.SubnetworkProblem` evaluates noisy children of ``density``, every layer
    mutable: genomes (a few hundred bytes) in, metrics out; each actor materialises children in place.
``engine, last two, no cache``
    The same with mutations restricted to the last two parameterised layers and activation caching off:
    the subspace alone, to separate its effect from the cache's.
``engine+cache``
    The same subspace with ``activation_cache_mb`` > 0: actors keep the parent's validation activations
    before the first mutable layer and run only the layers after it (identical results).
``stock EvoTorch``
    EvoTorch's ``GeneticAlgorithm`` with ``GaussianMutation(mutation_probability=density)`` over float
    vectors of all the parent's parameters, the population starting as copies of the parent; its actors
    receive full vectors and load each into a model (``vector_to_parameters``) before the same passes.

Each method runs in its own actors, created, warmed up (one candidate per actor: start-up, payload
transfer and cache building are excluded from the rates) and killed in turn, so every method's memory
is its own. Reported: candidates per second (median of ``repeats`` generations), the ratio to the limit
measured in the same run with the same actor count, the pickled bytes per candidate sent to actors, the
driver's peak private resident memory while the method ran (sampled in a background thread) and the largest
actor's peak resident memory (its own ``ru_maxrss``). Methods run one after another, so ratios carry
whatever else the machine did meanwhile; more repeats narrow that.

A second table shows the driver's peak memory against the population size (``populations``), for the
engine and stock EvoTorch, one generation each on the first ``SCALING_IMAGES`` validation images (the
driver's memory does not depend on how many images actors score).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import pickle
import statistics
import time
from dataclasses import replace
from typing import Callable

import numpy as np
import ray
import torch
from evotorch import Problem, SolutionBatch
from evotorch.algorithms import GeneticAlgorithm
from evotorch.operators import GaussianMutation

from .memory import DriverPeak, actors_peak_mb
from ..core.config import ChildrenConfig, DataConfig, ModelConfig, WorkersConfig
from ..tasks.classification.data import load_dataset
from ..core.worker import parent_fingerprint, torch_threads
from ..tasks.classification.evaluation import CandidateEvaluator, EvaluationPayload
from ..families import make_family
from ..tasks.classification.models import build_model
from ..nn import state_copy
from ..core.problem import ACTOR_ENV, actor_options, keep_single_actor, make_problem

BENCH_MODELS = {
    "cnn": ModelConfig(name="cnn2d"),  # ~0.1M parameters on 28x28 images
    "mlp10m": ModelConfig(name="mlp", kwargs={"hidden": [2048, 2048, 2048]}),  # ~10M parameters
}
# The last two parameterised layers of each model: the subspace of the caching methods.
LAST_TWO = {"cnn": ["head.1.*", "classifier.*"], "mlp10m": ["features.5.*", "classifier.*"]}
METHODS = ("limit", "engine", "engine, last two, no cache", "engine+cache", "stock EvoTorch")
CACHE_MB = 1024.0  # the configuration default of workers.activation_cache_mb
SIGMA = 0.1
SCALING_IMAGES = 500


# -------------------------------------------------------------------------------------------------- methods

@ray.remote
class ForwardPassActor:
    """Holds the parent and the validation data like an evaluation actor; runs plain validation passes."""

    def __init__(self, payload: EvaluationPayload):
        torch.set_num_threads(payload.threads)
        self.evaluator = CandidateEvaluator(payload, payload.device())

    def device(self) -> str:
        return str(self.evaluator.device)

    def passes(self, count: int) -> int:
        # The same thread setting, in the executing thread, as the engine's evaluation uses.
        with torch_threads(self.evaluator.payload.threads):
            for _ in range(count):
                self.evaluator.score_current()
        return count


def split_evenly(population: int, actors: int) -> list[int]:
    """How many of ``population`` candidates each of ``actors`` actors gets (differing by at most one)."""
    return [population // actors + (i < population % actors) for i in range(actors)]


class LimitMethod:
    """Plain validation passes of the parent, ``population`` per generation, split evenly over the actors."""

    def __init__(self, payload: EvaluationPayload, workers: WorkersConfig, population: int):
        self.population = population
        # No restarts: a benchmark actor that dies should fail the run, not be rebuilt from its payload.
        options = dict(actor_options(workers), max_restarts=0, max_task_retries=0)
        self.actors = [ForwardPassActor.options(num_gpus=workers.num_gpus_per_actor, **options).remote(payload)
                       for _ in range(workers.num_actors)]

    def warm_up(self) -> None:
        ray.get([a.passes.remote(1) for a in self.actors])

    def step(self) -> None:
        ray.get([a.passes.remote(n) for a, n in zip(self.actors, split_evenly(self.population, len(self.actors)))])

    def bytes_per_candidate(self) -> float:
        return 0.0  # nothing but a count per actor

    def devices(self) -> list[str]:
        return ray.get([a.device.remote() for a in self.actors])

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


class EngineMethod:
    """The engine: a SubnetworkProblem evaluating a generation of noisy children of the root."""

    def __init__(self, payload: EvaluationPayload, workers: WorkersConfig, population: int):
        self.population = population
        self.family = make_family(payload.children)
        self.root = self.family.root(payload.parent_id)
        self.rng = np.random.default_rng(0)
        self.problem = make_problem(workers, payload, fitness="accuracy", population=population)
        self.problem.all_remote_problems()  # creates the actors
        self.actors = self.problem.actors
        self.subbatch = workers.subbatch_size or max(1, math.ceil(population / (2 * workers.num_actors)))

    def _genomes(self, count: int) -> list[str]:
        return [g for _, g in self.family.propose([self.root], count, self.rng)]

    def warm_up(self) -> None:
        ray.get([a.evaluate_batch.remote(self.problem.make_batch(self._genomes(1))) for a in self.actors])

    def step(self) -> None:
        self.problem.evaluate(self.problem.make_batch(self._genomes(self.population)))

    def bytes_per_candidate(self) -> float:
        return len(pickle.dumps(self.problem.make_batch(self._genomes(self.subbatch)))) / self.subbatch

    def close(self) -> None:
        self.problem.close()


class StockProblem(Problem):
    """Stock EvoTorch: solutions are float vectors of all the parent's parameters, fitness its accuracy."""

    def __init__(self, payload: EvaluationPayload, parent_vector: torch.Tensor, workers: WorkersConfig):
        super().__init__("max", solution_length=parent_vector.numel(), initial_bounds=(-1.0, 1.0),
                         dtype=torch.float32, num_actors=workers.num_actors, actor_config=actor_options(workers),
                         num_gpus_per_actor=workers.num_gpus_per_actor or None)
        keep_single_actor(self, workers.num_actors, workers.num_gpus_per_actor)
        self._payload_ref = ray.put(payload)
        self._evaluator: CandidateEvaluator | None = None

    @property
    def _nonserialized_attribs(self) -> list[str]:
        return super()._nonserialized_attribs + ["_evaluator"]

    def _evaluate_batch(self, batch: SolutionBatch) -> None:
        if self._evaluator is None:
            payload = ray.get(self._payload_ref)
            torch.set_num_threads(payload.threads)
            self._evaluator = CandidateEvaluator(payload, payload.device())
        evaluator = self._evaluator
        fitness = []
        with torch_threads(evaluator.payload.threads):
            for values in batch.values:
                torch.nn.utils.vector_to_parameters(values.to(evaluator.device), evaluator.model.parameters())
                fitness.append(evaluator.score_current()[0])
        batch.set_evals(torch.tensor(fitness, dtype=torch.float32))


class StockMethod:
    """EvoTorch's GeneticAlgorithm with Gaussian mutation of ``density`` of the entries, from the parent."""

    def __init__(self, payload: EvaluationPayload, workers: WorkersConfig, population: int, density: float):
        model = build_model(payload.model, payload.input_shape, payload.num_classes)
        model.load_state_dict(payload.parent_state)
        self.parent = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
        self.population = population
        self.problem = StockProblem(payload, self.parent, workers)
        stdev = SIGMA * float(self.parent.std())  # one scale for all entries: the stock operator has no other
        self.ga = GeneticAlgorithm(self.problem, popsize=population, re_evaluate=False,
                                   operators=[GaussianMutation(self.problem, stdev=stdev,
                                                               mutation_probability=density)])
        self.ga.population.set_values(self.parent.expand(population, -1))
        self.problem.all_remote_problems()  # creates the actors
        self.actors = self.problem.actors

    def _parent_batch(self, size: int) -> SolutionBatch:
        batch = self.problem.generate_batch(size)
        batch.set_values(self.parent.expand(size, -1))
        return batch

    def warm_up(self) -> None:
        evals = ray.get([a.evaluate_batch.remote(self._parent_batch(1)) for a in self.actors])
        # Copies of the parent share its score: the population starts evaluated, as the engine's root
        # does, instead of the GA's first step evaluating ``population`` identical parents.
        self.ga.population.set_evals(evals[0][:, 0].expand(self.population).clone())
        self.ga._first_iter = False

    def step(self) -> None:
        self.ga.step()

    def bytes_per_candidate(self) -> float:
        # EvoTorch splits a batch into one piece per actor; a piece pickles its vectors (and its problem).
        piece = math.ceil(self.population / len(self.actors))
        return len(pickle.dumps(self.ga.population[:piece])) / piece

    def close(self) -> None:
        self.problem.kill_actors()


def _stock_gb(params: int, population: int) -> float:
    # Population, children, their concatenation and the next population: four float32 copies.
    return 16 * params * population / 2**30


# ----------------------------------------------------------------------------------------------- measuring

def _payload(model_cfg: ModelConfig, data, use_gpu: bool) -> EvaluationPayload:
    torch.manual_seed(0)
    model = build_model(model_cfg, data.input_shape, data.num_classes)
    state = state_copy(model)
    return EvaluationPayload(model=model_cfg, input_shape=data.input_shape, num_classes=data.num_classes,
                             parent_state=state, parent_id=parent_fingerprint(state), children=ChildrenConfig(),
                             val_x=data.validation.x, val_y=data.validation.y, batch_size=1000, threads=1,
                             use_gpu=use_gpu)


def _method_factories(name: str, base: EvaluationPayload, workers: WorkersConfig, population: int,
                      density: float) -> dict[str, Callable[[], object]]:
    everything = ChildrenConfig(density=density, sigma=SIGMA)
    last_two = ChildrenConfig(density=density, sigma=SIGMA, layers=LAST_TWO[name])
    full = replace(base, children=everything)
    return {
        "limit": lambda: LimitMethod(full, workers, population),
        "engine": lambda: EngineMethod(full, workers, population),
        "engine, last two, no cache": lambda: EngineMethod(replace(base, children=last_two), workers, population),
        "engine+cache": lambda: EngineMethod(replace(base, children=last_two, activation_cache_mb=CACHE_MB),
                                             workers, population),
        "stock EvoTorch": lambda: StockMethod(full, workers, population, density),
    }


def _measure(factory: Callable[[], object], population: int, repeats: int) -> dict:
    """Rate, bytes per candidate and memory of one method; its actors are killed whatever happens."""
    method = None
    try:
        with DriverPeak() as driver:
            method = factory()
            method.warm_up()
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                method.step()
                times.append(time.perf_counter() - started)
        actor_mb = actors_peak_mb(method.actors)
        sent = method.bytes_per_candidate()
    finally:
        if method is not None:
            method.close()
        # EvoTorch's objects form reference cycles: free this method's population before the next runs.
        del method
        gc.collect()
    return {"rate": population / statistics.median(times), "bytes_per_candidate": sent,
            "driver_mb": driver.peak_mb, "actor_mb": actor_mb}


def _params(payload: EvaluationPayload) -> int:
    return sum(v.numel() for k, v in payload.parent_state.items())


def _print_row(row: dict) -> None:
    if row.get("skipped"):
        print(f"{row['model']:<8}{row['params']:>12,}{row['actors']:>7}  {row['method']:<28}{row['skipped']}",
              flush=True)
        return
    print(f"{row['model']:<8}{row['params']:>12,}{row['actors']:>7}  {row['method']:<28}{row['rate']:>8.2f}"
          f"{row['ratio']:>8.2f}{row['bytes_per_candidate']:>14,.0f}{row['driver_mb']:>11,.0f}"
          f"{row['actor_mb']:>10,.0f}", flush=True)


def _throughput_rows(name: str, base: EvaluationPayload, workers: WorkersConfig, population: int,
                     density: float, repeats: int, stock_max_gb: float) -> list[dict]:
    params = _params(base)
    rows = []
    for method, factory in _method_factories(name, base, workers, population, density).items():
        row = {"model": name, "params": params, "actors": workers.num_actors, "method": method}
        if method == "stock EvoTorch" and _stock_gb(params, population) > stock_max_gb:
            row["skipped"] = f"skipped: needs ~{_stock_gb(params, population):.0f} GB > --stock-max-gb"
        else:
            row.update(_measure(factory, population, repeats))
        rows.append(row)
    limit = rows[0]["rate"]
    for row in rows:
        if not row.get("skipped"):
            row["ratio"] = row["rate"] / limit
        _print_row(row)
    return rows


def _memory_rows(name: str, base: EvaluationPayload, workers: WorkersConfig, populations: list[int],
                 density: float, stock_max_gb: float) -> list[dict]:
    small = replace(base, val_x=base.val_x[:SCALING_IMAGES], val_y=base.val_y[:SCALING_IMAGES])
    rows = []
    for method in ("engine", "stock EvoTorch"):
        row = {"model": name, "method": method, "driver_mb": {}}
        for population in populations:
            if method == "stock EvoTorch" and _stock_gb(_params(base), population) > stock_max_gb:
                row["driver_mb"][population] = None
                continue
            factory = _method_factories(name, small, workers, population, density)[method]
            row["driver_mb"][population] = _measure(factory, population, 1)["driver_mb"]
        rows.append(row)
        cells = "".join(f"{'skipped' if mb is None else f'{mb:,.0f}':>12}" for mb in row["driver_mb"].values())
        print(f"{name:<8}  {method:<16}{cells}", flush=True)
    return rows


def throughput(*, models: list[str], population: int = 32, actors: int | list[int] = (1, 2),
               density: float = 0.01, validation_size: int = 5000, repeats: int = 3,
               data_root: str | None = None, gpus_per_actor: float = 0.0, populations: list[int] = (32, 128),
               stock_max_gb: float = 8.0) -> dict[str, list[dict]]:
    """Run the benchmark and print its tables; returns their rows (``throughput`` and ``memory``).

    ``actors`` lists the actor counts to compare at; ``populations`` the population sizes of the memory
    table (empty: no memory table). Stock EvoTorch is skipped where its population would need more than
    ``stock_max_gb`` of driver memory.
    """
    unknown = [m for m in models if m not in BENCH_MODELS]
    if unknown:
        raise SystemExit(f"evo-subens bench: unknown model(s) {unknown}; choose from {sorted(BENCH_MODELS)}")
    actor_counts = [actors] if isinstance(actors, int) else list(actors)
    logging.getLogger("evotorch").setLevel(logging.WARNING)  # one INFO line per problem would bury the table
    data = load_dataset(DataConfig(name="fashion-mnist", path=data_root, validation_size=validation_size))
    if not ray.is_initialized():
        # One method's actors exist at a time; the slack covers killed actors not yet released.
        ray.init(num_cpus=max(os.cpu_count() or 1, 2 * max(actor_counts)), include_dashboard=False,
                 runtime_env={"env_vars": ACTOR_ENV})
    print(f"throughput: Fashion-MNIST, {len(data.validation)} validation images, population {population}, "
          f"density {density}, actors x 1 thread, median of {repeats}, "
          f"{'GPU' if gpus_per_actor > 0 else 'CPU'} actors")
    print(f"{'model':<8}{'params':>12}{'actors':>7}  {'method':<28}{'cand/s':>8}{'ratio':>8}{'bytes/cand':>14}"
          f"{'driver MB':>11}{'actor MB':>10}")
    payloads = {name: _payload(BENCH_MODELS[name], data, use_gpu=gpus_per_actor > 0) for name in models}
    rows = []
    for name in models:
        for count in actor_counts:
            workers = WorkersConfig(num_actors=count, threads_per_actor=1, num_gpus_per_actor=gpus_per_actor)
            rows += _throughput_rows(name, payloads[name], workers, population, density, repeats, stock_max_gb)
    memory = []
    if populations:
        count = max(actor_counts)
        print(f"\ndriver peak MB by population ({count} actors, one generation, first {SCALING_IMAGES} "
              f"validation images)")
        print(f"{'model':<8}  {'method':<16}" + "".join(f"{f'pop {p}':>12}" for p in populations))
        workers = WorkersConfig(num_actors=count, threads_per_actor=1, num_gpus_per_actor=gpus_per_actor)
        for name in models:
            memory += _memory_rows(name, payloads[name], workers, list(populations), density, stock_max_gb)
    return {"throughput": rows, "memory": memory}
