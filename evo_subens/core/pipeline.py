"""One run's stages, top to bottom: parent -> search -> members -> finetune -> accepted -> done.

Each stage is one method and ends with an atomic checkpoint of the :class:`~evo_subens.core.state.
RunState` (the search: one per generation, written from EvoTorch's after-step hook; fine-tuning: one per
member), so a resumed run goes on from the last one and ends with the same population log, members and
metrics as a run that was never stopped. Everything task-specific goes through the run's
:class:`~evo_subens.tasks.base.Task`.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import torch

from ..errors import RunDirError, UserError
from ..families import make_family
from ..nn import count_parameters, state_copy
from ..tasks.base import Progress, Task
from .checkpoint import save_checkpoint, set_rng_state
from .cluster import LOCAL_NODE, watch_head
from .config import RunConfig, config_to_dict
from .divergence import TieWarning, report_divergence
from .faults import crash_point
from .logs import load_population
from .problem import LOCAL_WORKER, make_problem
from .progress import Steps, after_generations, generation_name, run_seconds
from .rundir import write_json, write_population, write_state
from .pool import EnsemblePool
from .stalls import StallWatch
from .tracking import Tracker, Trackers, generation_stats, report_artefacts
from .search import REFERENCE_GENERATION, ROOT_CANDIDATE, CandidateRecord, SubnetworkSearch
from .state import RunResult, RunState
from .worker import numerics, parent_fingerprint


class Pipeline:
    """The stages of one subnetwork run, sharing the run's parent, workers and search."""

    def __init__(self, cfg: RunConfig, run_dir: Path, task: Task, parent: torch.nn.Module,
                 state: RunState | None, progress: Progress, trackers: Sequence[Tracker] = ()):
        self.cfg, self.run_dir, self.task, self.parent, self.progress = cfg, run_dir, task, parent, progress
        self.extra_trackers = list(trackers)
        self.state = state
        self.family = make_family(cfg.children)
        self.starts: dict[int, dict] = {}  # weights of trained children fetched while their workers are up
        self.tuned = cfg.search.scoring == "tuned"  # candidates fine-tuned before scoring; members not again

    def run(self) -> RunResult:
        """Every stage not done yet, then the results."""
        logging.getLogger("evotorch").setLevel(logging.WARNING)  # its per-problem INFO lines drown the progress
        self.progress(f"[run] {self.run_dir}")
        self.progress(self.task.describe_data())
        self.parent_stage()
        self.start_search()
        self.trackers = Trackers.open(self.cfg, self.run_dir, self.extra_trackers, self._tracked_generations)
        try:
            self._search_and_tune()
            chosen_states = self.stored_members()
            self.accept_stage(chosen_states)
            result = self.results_stage(chosen_states)
            if self.trackers is not None:
                self.trackers.finish(result.metrics, report_artefacts(self.run_dir))
            return result
        finally:
            if self.trackers is not None:
                self.trackers.close()

    def _search_and_tune(self) -> None:
        """The stages that use the workers, with the watches on the cluster running beside them."""
        head = watch_head(self.run_dir, self.cfg.workers, self.problem.resources_held())
        stalls = (StallWatch(self.problem, self.cfg.workers.stall_timeout, self.progress).start()
                  if self.cfg.workers.executor == "ray" and self.cfg.workers.stall_timeout else None)
        try:
            self.search_stage()
            self.members_stage()
            self.finetune_stage()
        finally:
            for watch in (head, stalls):
                if watch is not None:
                    watch.stop()
            self.generations.close()
            self.problem.close()

    # Stage 1 ---------------------------------------------------------------------------------------------
    def parent_stage(self) -> None:
        """Train (or load) the parent and store it; a resumed run reloads it and checks it is the same."""
        cfg, parent = self.cfg, self.parent
        if self.state is None:
            if cfg.model.parent_path:
                self.progress(f"[parent] loaded {cfg.model.parent_path} ({count_parameters(parent):,} parameters)")
                self.task.check_loaded_parent(parent)
            else:
                self.task.train_parent(parent)
            parent.eval()
            try:
                self.task.check_parent_learned(parent)
            except UserError as exc:
                if cfg.parent.check_learned or cfg.model.parent_path:
                    raise
                self.progress(f"[parent] warning: {exc}; going on, as parent.check_learned is false")
            self.parent_state = state_copy(parent)
            write_state(self.run_dir / "parent.pt", self.parent_state)
            self.state = RunState(stage="parent", parent_id=parent_fingerprint(self.parent_state))
            self._checkpoint()
        else:
            self.task.load_parent(self.run_dir / "parent.pt", parent)
            self.parent_state = state_copy(parent)
            if parent_fingerprint(self.parent_state) != self.state.parent_id:
                raise RunDirError(f"{self.run_dir / 'parent.pt'} is not the parent this run's checkpoint was "
                                  f"made with")
            set_rng_state(self.state.rng)
        parent.eval()

    # Stage 2 ---------------------------------------------------------------------------------------------
    def start_search(self) -> None:
        """Workers holding the parent, the parent's reference record, and the search where it stopped."""
        cfg, state = self.cfg, self.state
        payload = self.task.worker_payload(self.parent_state, state.parent_id)
        self.driver = payload.make_evaluator()  # builds members' weights here when they are cheap to rebuild
        self.reference = self._reference_record()
        # Under tuned scoring the reference is the parent fine-tuned like every candidate, not the parent itself.
        how = (f"fine-tuned like every candidate ({cfg.finetune.epochs} epoch(s)), then scored"
               if self.tuned and not self.family.trains_children else "scored like every candidate")
        self.progress(f"[parent] {how} on the {self.task.scored_on()}: "
                      + "  ".join(f"{name} {value:.4f}" for name, value in self.reference.metrics.items()))
        self.problem = make_problem(cfg.workers, payload, fitness=cfg.search.fitness,
                                    population=cfg.search.population)
        pool = None
        if self.tuned:
            pool = EnsemblePool(cfg.ensemble.size, self.task.pool_loss, parent=ROOT_CANDIDATE)
            selection, holdout = self.task.pool_outputs([self.parent_state])
            pool.add([ROOT_CANDIDATE], selection, holdout)
            pool.choose()
        self.search = SubnetworkSearch(self.problem, self.family, cfg.search, seed=cfg.seed,
                                       racing_rank=_racing_rank(cfg), reference=self.reference, pool=pool,
                                       pool_outputs=self._pool_outputs if self.tuned else None)
        if state.search:
            self.search.load_state_dict(state.search)
        self.searched = self.search.generation < cfg.search.generations and not self.search.stopped
        self.generations = Steps(self.progress, cfg.search.generations - self.search.generation, "[search]",
                                 "generations")
        self._first_generation = True
        self._step_started = 0.0
        self.ties = TieWarning(self.search.ranking, self.task.scored_on())
        self.search.before_step_hook.append(self._before_generation)
        self.search.after_step_hook.append(self._after_generation)

    def _reference_record(self) -> CandidateRecord:
        """The trained parent scored like a candidate, on the same validation data: the reference row of the
        population log and what generation 0's children are compared with."""
        root = self.family.root(self.state.parent_id)
        score = self.driver.evaluate_many([root])[0]
        metrics = {m.name: value for m, value in zip(self.task.metrics, score.values)}
        return CandidateRecord(REFERENCE_GENERATION, ROOT_CANDIDATE, ROOT_CANDIDATE, root,
                               metrics[self.cfg.search.fitness], metrics, score.seconds, LOCAL_WORKER,
                               node=LOCAL_NODE, host=LOCAL_NODE, finished_at=time.time())

    def _pool_outputs(self, records: list[CandidateRecord]):
        """Tuned candidates' outputs on the selection and held-back data, from their workers' weights."""
        return self.task.pool_outputs(self.states_of(records))

    def states_of(self, chosen: list[CandidateRecord]) -> list[dict]:
        """Weights of candidates: fetched from the workers that trained them, else rebuilt here."""
        if self.family.trains_children or self.tuned:
            return self.problem.child_states([r.genome for r in chosen], [r.worker for r in chosen])
        return [self.driver.child_state(r.genome) for r in chosen]

    def search_stage(self) -> None:
        """Generations until ``search.generations`` or an early stop; each checkpointed by the hook below."""
        while self.search.generation < self.cfg.search.generations and not self.search.stopped:
            self.search.step()
        self.generations.close()

    def _before_generation(self) -> None:
        self._step_started = time.perf_counter()

    def _after_generation(self) -> None:
        """After each generation (EvoTorch's after-step hook): held-back check, checkpoint, population log,
        progress line."""
        cfg, search, state = self.cfg, self.search, self.state
        seconds = time.perf_counter() - self._step_started
        state.checks = [*state.checks, dict(self._generation_check(), seconds=round(seconds, 3),
                                            finished_at=_utc_now())]
        state.stage, state.search = "search", search.state_dict()
        if not state.grow:
            state.members, state.tuned, state.accepted = [], 0, None
        self._checkpoint()
        rows = self._population_rows([])
        write_population(self.run_dir / "population.parquet", rows, self.family.log_columns,
                         [m.name for m in self.task.metrics])
        if self.trackers is not None:
            self.trackers.generations(self._tracked_generations)
        if self._first_generation:
            self._first_generation = False
            self.progress(f"[workers] evaluating {self._workers_where()}")
        for incident in search.incidents:
            if incident["generation"] == search.generation - 1:
                redone = incident.get("candidates")
                self.progress(f"[workers] actor-{incident['worker']} was lost (pid {incident['lost_pid']}) and "
                              f"restarted; its unfinished candidates were evaluated again"
                              + (f": its new process evaluated candidate(s) {', '.join(map(str, redone))}"
                                 if redone else ""))
        self.generations.step(self._generation_line(seconds, state.checks[-1]))
        report_divergence(rows, search.generation - 1, self.family, self.run_dir, self.progress)
        tied = self.ties.check(self._latest())
        if tied:
            self.progress(tied)
        if search.stopped:
            unrun = cfg.search.generations - search.generation
            self.progress(f"[search] stopped{' early' if unrun > 0 else ''} "
                          f"{after_generations(search.generation, cfg.search.generations)}: "
                          f"{cfg.search.patience} generation(s) without a better best candidate (search.patience)"
                          + (f"; {unrun} planned generation(s) not run" if unrun > 0 else ""))
        crash_point("search.after_generation")

    def _workers_where(self) -> str:
        """Where the workers run: 'in-process on cpu', or '2 Ray actors on cpu, nodes 10.0.0.5 (2)'."""
        devices = ", ".join(sorted(set(self.problem.worker_devices())))
        if self.problem.actors is None:
            return f"in-process on {devices}"
        hosts = Counter(self.problem.worker_hosts())
        nodes = ", ".join(f"{host} ({count})" for host, count in sorted(hosts.items()))
        return f"{len(self.problem.actors)} Ray actors on {devices}, node{'s' if len(hosts) > 1 else ''} {nodes}"

    def _latest(self) -> list[CandidateRecord]:
        return [r for r in self.search.records if r.generation == self.search.generation - 1]

    def _generation_check(self) -> dict:
        """The best candidate of the generation just evaluated, with its metrics on held-back validation
        data: whether later generations beat generation 0 on data no decision saw."""
        search = self.search
        if self.tuned:
            return self._ensemble_check()
        best = min(self._latest(), key=search.ranking.key)
        weights = None if math.isnan(best.fitness) else (lambda: self.states_of([best])[0])
        return {"generation": best.generation, "candidate": best.candidate, **best.metric_row(),
                **self.task.holdout_check(weights),
                "step_scale": search.history[-1]["step_scale"] if search.history else 1.0,
                "success_rate": search.history[-1]["success_rate"] if search.history else None}

    def _ensemble_check(self) -> dict:
        """Tuned scoring: the ensemble chosen after the generation just evaluated, on the selection split and
        on held-back data (whether later generations improve the ensemble on data no decision saw)."""
        search, pool = self.search, self.search.pool
        members = pool.members
        held = pool.holdout_probs(members)
        held_metrics = self.task.holdout_metrics(held) if held is not None else {}
        history = search.history[-1]
        return {"generation": search.generation - 1, "members": list(members), "ensemble_size": len(members),
                "parent_in_ensemble": ROOT_CANDIDATE in members, "ensemble_nll": pool.ensemble_loss(members),
                **{f"holdout_ensemble_{name}": value for name, value in held_metrics.items()},
                "joined": sum(r.is_elite for r in self._latest()), "step_scale": history["step_scale"],
                "next_step_scale": search.step_scale}

    def _tuned_line(self, seconds: float, check: dict) -> str:
        latest = self._latest()
        fitness = sorted(r.ensemble_nll for r in latest if not math.isnan(r.ensemble_nll)) or [math.nan]
        held = check.get("holdout_ensemble_nll")
        return (f"[search] {generation_name(self.search.generation - 1, self.cfg.search.generations)}  "
                f"{len(latest)} tuned candidates, ensemble nll with each: best {fitness[0]:.4f}  "
                f"median {fitness[len(fitness) // 2]:.4f}  ensemble: {check['ensemble_size']} member(s)"
                f"{' (parent included)' if check['parent_in_ensemble'] else ''}, {check['joined']} new, "
                f"val nll {check['ensemble_nll']:.4f}"
                + (f", held-back nll {held:.4f}" if held is not None else "")
                + f"  sigma x{check['step_scale']:.2f} -> x{check['next_step_scale']:.2f}"
                f"  ({len(latest)} candidates in {seconds:.1f}s)")

    def _generation_line(self, seconds: float, check: dict) -> str:
        cfg, search = self.cfg, self.search
        if self.tuned:
            return self._tuned_line(seconds, check)
        latest = self._latest()
        ranked = sorted(latest, key=search.ranking.key)
        best, median, worst = ranked[0], ranked[len(ranked) // 2], ranked[-1]
        held = ""
        if check[f"holdout_{cfg.search.fitness}"] is not None:
            held = "  best on held-back: " + " ".join(f"{m.short} {check['holdout_' + m.name]:.4f}"
                                                        for m in self.task.metrics if m.ranks)
        return (f"[search] {generation_name(search.generation - 1, cfg.search.generations)}  "
                f"val {cfg.search.fitness}: "
                f"best {best.fitness:.4f}  median {median.fitness:.4f}  worst {worst.fitness:.4f}  "
                f"elite best {search.elites[0].fitness if search.elites else math.nan:.4f}{held}  "
                f"step x{check['step_scale']:.2f}  "
                f"({len(latest)} candidates in {seconds:.1f}s, {len(latest) / seconds:.1f}/s)")

    # Stage 3 ---------------------------------------------------------------------------------------------
    def members_stage(self) -> None:
        """Select candidates, by position. Growing keeps every earlier position and adds new ones."""
        cfg, state, search = self.cfg, self.state, self.search
        if state.stage not in ("parent", "search") and not self.searched:
            return
        if self.tuned:
            self._tuned_members()
            return
        growing = bool(state.grow)
        prior = [search.records[c] for c in state.members] if growing else []
        count = state.grow if growing else cfg.ensemble.size
        self.progress(f"[members] choosing {count} candidate(s) ({cfg.ensemble.selection}) from "
                      f"{len(search.records):,} on the validation split")
        fresh, comparison = self.task.select(search.records, count, prior, self.states_of)
        trained = self.family.trains_children
        if trained:
            for position, (member, member_state) in enumerate(zip(fresh, self.states_of(fresh)), start=len(prior)):
                if cfg.finetune.epochs:
                    self.starts[position] = member_state
                else:
                    self._save_member(position, member_state, member.genome)
        settled = len(prior) + (len(fresh) if trained and not cfg.finetune.epochs else 0)
        state.accepted = state.ensemble if growing else []
        state.stage, state.members, state.tuned = "members", [m.candidate for m in prior + fresh], settled
        state.decided, state.grow = len(prior), None
        if comparison is not None:
            state.selection = comparison
        self._checkpoint()

    def _tuned_members(self) -> None:
        """Tuned scoring: the members are the pool's ensemble, with the weights they were scored with (the
        parent's own where it is one); nothing is tuned or accepted after this."""
        state, members = self.state, list(self.search.pool.members)
        self.progress(f"[members] the greedy ensemble of the tuned candidates and the parent: {len(members)} "
                      f"member(s)")
        records = [self._record(c) for c in members]
        fetched = iter(self.states_of([r for r in records if r.candidate != ROOT_CANDIDATE]))
        for position, record in enumerate(records):
            weights = self.parent_state if record.candidate == ROOT_CANDIDATE else next(fetched)
            self._save_member(position, weights, record.genome)
        if members == [ROOT_CANDIDATE]:
            self.progress("[ensemble] no tuned candidate lowers the parent's validation NLL, alone or beside it: "
                          "the ensemble is the parent alone")
        state.stage, state.members, state.tuned = "members", members, len(members)
        state.decided, state.accepted, state.grow = len(members), list(range(len(members))), None
        self._checkpoint()

    # Stage 4 ---------------------------------------------------------------------------------------------
    def finetune_stage(self) -> None:
        """Optimise: fine-tune the selected candidates in the workers, in parallel, storing each in order."""
        cfg, state = self.cfg, self.state
        chosen = self._chosen()
        if not cfg.finetune.epochs or state.tuned >= len(chosen):
            return
        pending = range(state.tuned, len(chosen))
        self.problem.start_actors()  # a run resumed here evaluated nothing yet in this process
        kept = state.decided  # grow: the members from before it, tuned then
        self.progress(f"[finetune] {len(pending)} {'new ' if kept else ''}member(s), {cfg.finetune.epochs} "
                      f"epoch(s) each, {self._workers_where()}")
        # The seed of a member's fine-tuning is a function of the run seed and its position, whichever
        # worker tunes it.
        jobs = [(chosen[i].genome, cfg.seed + 1 + i, self.starts.get(i)) for i in pending]
        with Steps(self.progress, len(pending), "[finetune]", "members") as tuning:
            for i, tuned in zip(pending, self.problem.finetune(jobs)):
                self._save_member(i, tuned, chosen[i].genome)
                state.stage, state.tuned = "finetune", i + 1
                self._checkpoint()
                tuning.step(f"[finetune] new member {i + 1 - kept}/{len(chosen) - kept} done (member {i + 1} of "
                            f"{len(chosen)})" if kept else f"[finetune] member {i + 1}/{len(chosen)} done")
                crash_point("finetune.after_member")

    def stored_members(self) -> list[dict]:
        """The weights of every selected candidate: stored ones from members/, others rebuilt."""
        return [self._load_member(i, m.genome) if self._stored() else self.driver.child_state(m.genome)
                for i, m in enumerate(self._chosen())]

    # Stage 5 ---------------------------------------------------------------------------------------------
    def accept_stage(self, chosen_states: list[dict]) -> None:
        """Acceptance on validation data: a selected member joins only if it improves the ensemble."""
        state = self.state
        chosen = self._chosen()
        if state.stage == "done" or state.decided >= len(chosen):
            return
        accepted, decided = list(state.accepted or []), state.decided
        joined = self.task.accept([chosen_states[i] for i in accepted], chosen_states[decided:])
        rejected = len(chosen) - decided - len(joined)
        if rejected:
            self.progress(f"[ensemble] {len(joined)} of {len(chosen) - decided} fine-tuned candidates accepted; "
                          f"{rejected} would have made the validation ensemble worse")
        accepted = accepted + [decided + j for j in joined]
        if self.task.prefers_parent(self.parent_state, [chosen_states[i] for i in accepted]):
            # The parent is a candidate member too: an ensemble worse than it is replaced by the parent alone,
            # stored as one more position.
            self.progress("[ensemble] the accepted ensemble's validation NLL is above the parent's: the ensemble "
                          "is the parent alone")
            position = len(chosen)
            self._save_member(position, self.parent_state, self.reference.genome)
            chosen_states.append(self.parent_state)
            state.members = [*state.members, ROOT_CANDIDATE]
            state.tuned, accepted = position + 1, [position]
        state.stage, state.accepted, state.decided = "accepted", accepted, len(state.members)
        self._checkpoint()

    # Stage 6 ---------------------------------------------------------------------------------------------
    def results_stage(self, chosen_states: list[dict]) -> RunResult:
        """The ensemble on the test data, touched only here, after every decision; metrics.json."""
        cfg, state, search, task = self.cfg, self.state, self.search, self.task
        chosen = self._chosen()
        positions = state.ensemble
        members = [chosen[i] for i in positions]
        rows = self._population_rows([m.candidate for m in members])
        write_population(self.run_dir / "population.parquet", rows, self.family.log_columns,
                         [m.name for m in self.task.metrics])
        write_json(self.run_dir / "members.json", [
            {"candidate": m.candidate, "genome": m.genome, "weights": _member_file(i) if self._stored() else None,
             **m.metric_row()} for i, m in zip(positions, members)])
        write_json(self.run_dir / "incidents.json", search.incidents)
        metrics = task.results(self.parent, [chosen_states[i] for i in positions], [m.candidate for m in members])
        metrics["search"] = _search_summary(search, state.checks, cfg)
        metrics["rejected"] = [chosen[i].candidate for i in range(len(chosen)) if i not in set(positions)]
        if state.selection:
            metrics["selection"] = state.selection
        metrics["method"] = "subnetworks"
        metrics["cost"] = task.cost(records=search.records, selected=len(chosen), members=len(members))
        metrics["verdict"] = task.verdict(metrics)
        metrics["numerics"] = numerics()
        write_json(self.run_dir / "metrics.json", metrics)
        state.stage, state.grow = "done", None
        self._checkpoint()
        for line in task.summary(metrics, len(chosen)):
            self.progress(line)
        for line in task.diagnostics([r for r in rows if r["generation"] >= 0]) + task.warnings(metrics):
            self.progress(line)
        self.progress(f"[run] results in {self.run_dir} ({run_seconds():.0f}s)")
        return RunResult(self.run_dir, metrics, load_population(self.run_dir), [m.genome for m in members])

    def _tracked_generations(self, first: int) -> list[dict[str, float]]:
        """The trackers' statistics of generations ``first`` on."""
        return generation_stats(self.state.checks[first:], self.search.records,
                                self.search.ranking.fitness_metric.higher_is_better)

    # Helpers ---------------------------------------------------------------------------------------------
    def _chosen(self) -> list[CandidateRecord]:
        return [self._record(c) for c in self.state.members]

    def _record(self, candidate: int) -> CandidateRecord:
        """The record of candidate id ``candidate``; the parent's reference record for ROOT_CANDIDATE."""
        return self.reference if candidate == ROOT_CANDIDATE else self.search.records[candidate]

    def _stored(self) -> bool:
        """Whether members' weights are stored (trained or tuned), rather than rebuilt from their genomes."""
        return self.family.trains_children or self.cfg.finetune.epochs > 0

    def _population_rows(self, members: list[int]) -> list[dict]:
        """Rows of the population log: the parent's reference row (generation -1), then every candidate."""
        member_ids = set(members)
        rows = []
        for record in [self.reference, *self.search.records]:
            row = record.as_row()
            row["is_member"] = record.candidate in member_ids
            row.update(self.family.log_row(record.genome, record.step_scale))
            row["worker"] = "local" if record.worker == LOCAL_WORKER else f"actor-{record.worker}"
            rows.append(row)
        return rows

    def _checkpoint(self) -> None:
        save_checkpoint(self.run_dir, dict(self.state.to_dict(), config=config_to_dict(self.cfg)))

    def _save_member(self, position: int, weights: dict, genome: str) -> None:
        (self.run_dir / "members").mkdir(exist_ok=True)
        write_state(self.run_dir / _member_file(position), self.family.pack(weights, genome, self.driver.materialiser))

    def _load_member(self, position: int, genome: str) -> dict:
        packed = torch.load(self.run_dir / _member_file(position), map_location="cpu", weights_only=True)
        return self.family.unpack(packed, genome, self.driver.materialiser)


def _utc_now() -> str:
    """The current wall-clock time, ISO 8601 in UTC to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _member_file(position: int) -> str:
    return f"members/{position}.pt"


def _search_summary(search: SubnetworkSearch, checks: list[dict], cfg: RunConfig) -> dict:
    """Per generation: the best candidate on validation and held-back validation, the step scale and the
    1/5 success rate; whether a later generation beat generation 0 on held-back data; early stop."""
    later = None
    key = "holdout_ensemble_nll" if cfg.search.scoring == "tuned" else f"holdout_{cfg.search.fitness}"
    held = [c for c in checks if c.get(key) is not None]
    if len(held) > 1:
        sign = -1 if search.ranking.fitness_metric.higher_is_better else 1
        later = any(sign * c[key] < sign * held[0][key] for c in held[1:])
    return {"generations": checks, "later_generations_beat_first": later, "stopped_early": search.stopped,
            "generations_run": search.generation}


def _racing_rank(cfg: RunConfig) -> int:
    """How many of the best candidates racing must never stop: the elites and whatever ensemble selection
    draws from (0 when racing is off)."""
    if not cfg.search.racing:
        return 0
    drawn = cfg.ensemble.size if cfg.ensemble.selection == "topk" else cfg.ensemble.pool or 4 * cfg.ensemble.size
    return max(cfg.search.elites, drawn)
