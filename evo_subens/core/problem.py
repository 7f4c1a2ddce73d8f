"""The EvoTorch problem whose solutions are genomes, evaluated in Ray actors or in this process.

EvoTorch manages the actors (creation, resources, splitting a batch into pieces); the payload reaches
each actor once through Ray's object store (EvoTorch's shared attributes), and afterwards every task
carries only genome strings. The in-process executor is the same Problem with no actors, so both run
the task's :class:`~evo_subens.core.worker.Evaluator` on the same inputs.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Callable, Iterator

import ray
import torch
from evotorch import Problem, SolutionBatch
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .cluster import (LOCAL_NODE, check_placeable, connect, current_node, make_placement_group,
                      release_placement_group, resolve_address, token_authentication)
from .config import WorkersConfig
from .divergence import is_diverged
from ..errors import ConfigError
from .worker import Evaluator, RacingBound, WorkerPayload, torch_threads
from .faults import crash_point
from .shared_payload import SharedPayload

# Columns of the evaluation data every candidate returns after its fitness and its metrics (val_<name>).
EVAL_COLUMNS = ("eval_seconds", "worker", "pid", "raced", "diverged", "finished_at")
LOCAL_WORKER = -1

# glibc's default thresholds made the evaluation loop page-fault heavily (measured ~1.6x slower).
ACTOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}


def ensure_ray(address: str | None = None) -> None:
    """Start or join Ray once per process: ``address``, else ``RAY_ADDRESS``, else a local instance
    (see :func:`evo_subens.core.cluster.connect`)."""
    connect(address, local_runtime_env={"env_vars": ACTOR_ENV})


def default_num_actors(workers: WorkersConfig) -> int:
    """One actor per available CPU (divided by the threads each actor uses), capped by GPUs if requested."""
    resources = ray.cluster_resources()
    count = int(resources.get("CPU", 1)) // workers.threads_per_actor
    if workers.num_gpus_per_actor > 0 and resources.get("GPU", 0) > 0:
        count = min(count, int(resources["GPU"] / workers.num_gpus_per_actor))
    return max(1, count)


def keep_single_actor(problem: Problem, num_actors: int | None, num_gpus_per_actor: float | None) -> None:
    """Undo EvoTorch's turning ``num_actors=1`` into in-process evaluation, for a problem just constructed.

    The one actor asked for is kept: on a cluster the driver may have no GPU, and the Ray path must stay
    the same for any actor count.
    """
    if num_actors == 1:
        problem._num_actors = 1
        problem._num_gpus_per_actor = num_gpus_per_actor or None


class SubnetworkProblem(Problem):
    """Single-objective EvoTorch problem over genome strings (``dtype=object``).

    The fitness is the validation metric ``fitness`` of the payload's task (``payload.metrics``), maximised
    or minimised as the metric says; the evaluation data holds every metric, then :data:`EVAL_COLUMNS`.
    """

    def __init__(self, payload: WorkerPayload, *, fitness: str, num_actors: int = 0,
                 actor_config: dict | None = None, num_gpus_per_actor: float | None = None,
                 subbatch_size: int | None = None):
        self.metrics = tuple(payload.metrics)
        names = [m.name for m in self.metrics]
        criteria = [m.name for m in self.metrics if m.ranks]
        if fitness not in criteria:
            raise ConfigError("search.fitness", f"one of the task's ranking metrics ({', '.join(criteria)})", fitness)
        self.fitness_index = names.index(fitness)
        # No solution stats: the search keeps its own elites, and EvoTorch's best-so-far tracking fails on a
        # batch with no finite fitness (every child diverged).
        super().__init__("max" if self.metrics[self.fitness_index].higher_is_better else "min", dtype=object,
                         eval_dtype=torch.float64, eval_data_length=len(self.metrics) + len(EVAL_COLUMNS),
                         num_actors=num_actors, actor_config=actor_config,
                         num_gpus_per_actor=num_gpus_per_actor or None, subbatch_size=subbatch_size,
                         store_solution_stats=False)
        keep_single_actor(self, num_actors, num_gpus_per_actor)
        self.payload: WorkerPayload | None = payload
        # Actors fetch the payload by name from a holder the driver keeps for the problem's life: Ray can then
        # rebuild a lost actor from its (small) creation task and the actor fetches the payload again.
        self._shared_payload = SharedPayload(payload) if self._num_actors else None
        self._evaluator: Evaluator | None = None
        self._nodes: dict[tuple[int, int], tuple[str, str]] = {}  # (actor index, pid) -> Ray node id and IP
        self.placement_group: PlacementGroup | None = None  # owned by the driver's problem, released on close

    def node_id(self) -> tuple[str, str]:
        """The Ray node this process runs on and that node's IP address (called on an actor by the driver)."""
        return current_node(), ray.util.get_node_ip_address()

    def worker_node(self, worker: int, pid: int) -> tuple[str, str]:
        """The Ray node id and IP address of the worker that reported ``(worker, pid)``; ``local`` (both) for
        in-process evaluation.

        Asked once per actor process; a restarted actor (new pid) may be on another node and is asked again.
        """
        if worker == LOCAL_WORKER or self.actors is None:
            return LOCAL_NODE, LOCAL_NODE
        key = (worker, pid)
        if key not in self._nodes:
            self._nodes[key] = tuple(ray.get(self.actors[worker].call.remote("node_id", [], {})))
        return self._nodes[key]

    def seen_processes(self) -> dict[tuple[int, int], tuple[str, str]]:
        """``(actor index, pid) -> (node id, IP)`` of every actor process whose results the driver has read,
        oldest first (a copy: the stall watch reads it from another thread)."""
        return dict(self._nodes)

    def resources_held(self) -> dict[str, float]:
        """The CPUs and GPUs the actors hold together (none for the in-process executor)."""
        if not self._num_actors:
            return {}
        threads = self.payload.threads if self.payload is not None else 1
        return {"CPU": float(self._num_actors * threads),
                "GPU": float(self._num_actors * (self._num_gpus_per_actor or 0))}

    def alive(self) -> int:
        """This process's id: the stall watch's ping (answered in the actor's second call slot, beside any
        work in the first)."""
        return os.getpid()

    def start_actors(self) -> None:
        """Start the configured actors now. EvoTorch starts them at the first evaluation, which a run resumed
        after its search never reaches: without this its members would tune in the driver."""
        if self.is_main and self._num_actors and self.actors is None:
            self.all_remote_problems()

    def worker_hosts(self) -> list[str]:
        """Where the workers run: each actor's node IP address, or ``local`` for the in-process executor."""
        if self.actors is None:
            return [LOCAL_NODE]
        return [ip for _, ip in self.all_remote_problems().node_id()]

    @property
    def _nonserialized_attribs(self) -> list[str]:
        return super()._nonserialized_attribs + ["payload", "_evaluator", "_nodes", "placement_group"]

    def _get_evaluator(self) -> Evaluator:
        if self._evaluator is None:
            if self.payload is None:
                self.payload = self._shared_payload.get()
            if self.is_remote:
                torch.set_num_threads(self.payload.threads)
            self._evaluator = self.payload.make_evaluator(self.payload.device())
        return self._evaluator

    def evaluation_device(self) -> str:
        """The device this problem instance evaluates on (called on each actor to report placement)."""
        return str(self._get_evaluator().device)

    def worker_devices(self) -> list[str]:
        """The evaluation device of every actor, or of this process for the in-process executor."""
        if self.actors is None:
            return [self.evaluation_device()]
        return self.all_remote_problems().evaluation_device()

    def _evaluate_batch(self, batch: SolutionBatch) -> None:
        evaluator = self._get_evaluator()
        worker = LOCAL_WORKER if self.actor_index is None else self.actor_index
        rows = []
        genomes = list(batch.values)
        chunk = self.payload.stack_candidates
        with torch_threads(self.payload.threads):
            for start in range(0, len(genomes), chunk):
                if self.is_main and start <= len(genomes) // 2 < start + chunk:
                    crash_point("search.mid_generation")
                for score in evaluator.evaluate_many(genomes[start:start + chunk]):
                    values = list(score.values)
                    diverged = not score.raced and is_diverged(values)
                    if diverged:  # NaN metrics rank last; an infinite NLL would still rank by its accuracy
                        values = [math.nan] * len(values)
                    rows.append([values[self.fitness_index], *values, score.seconds, worker, os.getpid(),
                                 score.raced, diverged, time.time()])
        batch.set_evals(torch.tensor(rows, dtype=torch.float64))

    def unpack(self, row) -> tuple[float, dict[str, float], tuple[float, ...]]:
        """One candidate's evaluation data as (fitness, metrics by name, the :data:`EVAL_COLUMNS` values)."""
        values = [float(v) for v in row]
        count = len(self.metrics)
        metrics = {m.name: v for m, v in zip(self.metrics, values[1:1 + count])}
        return values[0], metrics, tuple(values[1 + count:])

    def set_racing_bound(self, bound: RacingBound | None) -> None:
        """The racing bound of the next evaluations (None: score every candidate fully), here and on every
        actor. A restarted actor scores fully until the next generation sets it again."""
        if self.is_main and self.actors is not None:
            ray.get([actor.call.remote("set_racing_bound", [bound], {}) for actor in self.actors])
        else:
            self._get_evaluator().racing_bound = bound

    def local_child_states(self, genomes: list[str]) -> list[dict[str, torch.Tensor]]:
        """Weights of children this process evaluated (or rebuilds); called on actors by the driver."""
        evaluator = self._get_evaluator()
        with torch_threads(self.payload.threads):
            return [evaluator.child_state(genome) for genome in genomes]

    def child_states(self, genomes: list[str], workers: list[int]) -> list[dict[str, torch.Tensor]]:
        """Weights of children, fetched from the worker that evaluated each (``workers``: actor indices).

        A worker that no longer holds a child (restarted, or another process) rebuilds it: the result is
        the same, only slower.
        """
        self.start_actors()
        if self.actors is None:
            return self.local_child_states(genomes)
        states: list[dict | None] = [None] * len(genomes)
        by_actor: dict[int, list[int]] = {}
        for i, worker in enumerate(workers):
            by_actor.setdefault(worker % len(self.actors), []).append(i)
        futures = {actor: self.actors[actor].call.remote("local_child_states", [[genomes[i] for i in idx]], {})
                   for actor, idx in by_actor.items()}
        for actor, idx in by_actor.items():
            for i, state in zip(idx, ray.get(futures[actor])):
                states[i] = state
        return states

    def local_finetune(self, genome: str, seed: int, start: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """One member's fine-tuned weights (see :meth:`~evo_subens.core.worker.Evaluator.finetuned_state`); called on an
        actor by the driver, or in-process."""
        evaluator = self._get_evaluator()
        with torch_threads(self.payload.threads):
            return evaluator.finetuned_state(genome, seed, start)

    def finetune(self, jobs: list[tuple[str, int, dict | None]]) -> Iterator[dict[str, torch.Tensor]]:
        """Fine-tuned weights of each ``(genome, seed, start weights or None)`` job, yielded in job order.

        On actors the members tune in parallel, one job per actor at a time (an actor's second call slot is
        kept for the stall watch's pings), while the caller stores (and checkpoints) each result as it comes;
        in-process they run one after another, through the same code. A job's result does not depend on
        the actor that runs it.
        """
        self.start_actors()
        if self.actors is None:
            for genome, seed, start in jobs:
                yield self.local_finetune(genome, seed, start)
            return
        waiting, running, done, next_out = list(enumerate(jobs)), {}, {}, 0
        idle = list(range(len(self.actors)))
        while next_out < len(jobs):
            while idle and waiting:
                actor, (i, (genome, seed, start)) = idle.pop(0), waiting.pop(0)
                running[self.actors[actor].call.remote("local_finetune", [genome, seed, start], {})] = (i, actor)
            ready, _ = ray.wait(list(running), num_returns=1)
            i, actor = running.pop(ready[0])
            done[i] = ray.get(ready[0])
            idle.append(actor)
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1

    def make_batch(self, genomes: list[str]) -> SolutionBatch:
        """An unevaluated batch holding ``genomes``."""
        batch = SolutionBatch(self, popsize=len(genomes), empty=True)
        batch.set_values(genomes)
        return batch

    def close(self) -> None:
        """Kill the evaluation actors and release their placement group (no-op for the in-process executor)."""
        if self.actors is not None:
            self.kill_actors()
        if self._shared_payload is not None:
            self._shared_payload.release()
        release_placement_group(self.placement_group)
        self.placement_group = None


def actor_options(workers: WorkersConfig, group: PlacementGroup | None = None) -> dict:
    """Ray options of an evaluation actor: its CPUs, custom resources, placement and the environment its
    process starts with.

    GPUs are not listed: EvoTorch adds ``num_gpus`` from ``num_gpus_per_actor`` itself. EvoTorch gives
    every actor the same options, so actors name no bundle index: each bundle holds exactly one actor's
    resources (at least one CPU), hence Ray puts each actor in a bundle of its own.
    """
    env = dict(ACTOR_ENV, OMP_NUM_THREADS=str(workers.threads_per_actor))
    # A lost actor (process killed, node gone) is restarted by Ray and its unfinished tasks are retried,
    # so a generation completes with every candidate evaluated exactly once.
    # Two call slots: the work (the driver sends an actor one piece of work at a time) and the stall watch's
    # pings, which a stopped or stuck process cannot answer while a busy one can.
    options = {"num_cpus": workers.threads_per_actor, "runtime_env": {"env_vars": env},
               "max_restarts": -1, "max_task_retries": -1, "max_concurrency": 2}
    if workers.resources:
        options["resources"] = dict(workers.resources)
    if group is not None:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group)
    return options


def prepare_workers(workers: WorkersConfig, progress: Callable[[str], None] = print) -> None:
    """Start or join Ray and refuse actor requests the cluster cannot place, before any training: a run
    that cannot evaluate stops before its parent is trained and before its run directory exists."""
    if workers.executor != "ray":
        return
    if not ray.is_initialized():
        address, _ = resolve_address(workers.address)
        started = time.perf_counter()
        progress(f"[workers] joining the Ray cluster at {address}" if address else
                 "[workers] starting Ray on this machine")
        ensure_ray(workers.address)
        auth = "token authentication on" if token_authentication() else "no token authentication (RAY_AUTH_MODE)"
        progress(f"[workers] Ray is up, {auth} ({time.perf_counter() - started:.1f}s)")
    _fit_to_cluster(workers, workers.num_actors or default_num_actors(workers))


def make_problem(workers: WorkersConfig, payload: WorkerPayload, *, fitness: str,
                 population: int) -> SubnetworkProblem:
    """The problem for ``workers.executor``: Ray actors as configured, or in-process evaluation."""
    if workers.executor == "local":
        return SubnetworkProblem(payload, fitness=fitness)
    ensure_ray(workers.address)
    num_actors = workers.num_actors or default_num_actors(workers)
    gpus_per_actor = _fit_to_cluster(workers, num_actors)
    # About two tasks per actor per generation balances uneven candidates without much task overhead.
    subbatch = workers.subbatch_size or max(1, math.ceil(population / (2 * num_actors)))
    group = make_placement_group(workers, num_actors, gpus_per_actor)
    try:
        problem = SubnetworkProblem(payload, fitness=fitness, num_actors=num_actors,
                                    actor_config=actor_options(workers, group),
                                    num_gpus_per_actor=gpus_per_actor, subbatch_size=subbatch)
    except BaseException:
        release_placement_group(group)
        raise
    problem.placement_group = group
    return problem


_warned_no_gpu: list[bool] = []


def _fit_to_cluster(workers: WorkersConfig, num_actors: int) -> float:
    """Refuse actor requests the Ray cluster can never place (Ray would wait for them forever).

    Returns the GPUs to request per actor: none when the cluster has no GPU at all, in which case the
    actors evaluate on their CPUs, as ``workers.num_gpus_per_actor`` documents.
    """
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    if num_actors * workers.threads_per_actor > cpus:
        raise ConfigError("workers.num_actors", f"num_actors * threads_per_actor <= {cpus:g}, the CPUs of the "
                                                f"Ray cluster (threads_per_actor={workers.threads_per_actor})",
                          num_actors)
    gpus_per_actor = workers.num_gpus_per_actor
    if gpus_per_actor > 0 and gpus == 0 and not _warned_no_gpu:
        _warned_no_gpu.append(True)  # once per process: prepare_workers and make_problem both get here
        logging.getLogger(__name__).warning("workers.num_gpus_per_actor=%g but the Ray cluster has no GPU; "
                                            "evaluating on CPUs", workers.num_gpus_per_actor)
    if gpus_per_actor > 0 and gpus == 0:
        gpus_per_actor = 0.0
    if num_actors * gpus_per_actor > gpus:
        raise ConfigError("workers.num_gpus_per_actor", f"num_actors * num_gpus_per_actor <= {gpus:g}, the GPUs "
                                                        f"of the Ray cluster (num_actors={num_actors})",
                          workers.num_gpus_per_actor)
    # Totals can suffice while no single node fits an actor (custom resources, CPUs split over nodes).
    check_placeable(workers, num_actors, gpus_per_actor)
    return gpus_per_actor
