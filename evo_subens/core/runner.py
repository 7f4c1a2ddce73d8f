"""One run, top to bottom: data -> parent -> search -> members -> fine-tune -> ensemble -> test metrics.

Every stage ends with an atomic checkpoint, so :func:`resume` goes on from the last one and ends with
the same population log, members and metrics as a run that was never stopped; :func:`grow` adds
members to a finished run.

    >>> import evo_subens
    >>> result = evo_subens.run("configs/default.yaml", ["search.generations=2"])
    >>> result.metrics["ensemble"]["nll"] < result.metrics["parent"]["nll"]
    >>> evo_subens.resume(result.run_dir, ["search.generations=4"])   # extend the finished search
    >>> evo_subens.grow(result.run_dir, members=4)                     # 4 more members
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from .checkpoint import load_latest_checkpoint, save_checkpoint, set_rng_state
from .cluster import check_address, check_before_run
from .config import RunConfig, apply_overrides, config_from_dict, config_to_dict, load_config
from .cost import subnetwork_cost
from ..errors import ConfigError, RunDirError, UserError
from ..tasks.classification.calibration import temperature_scaled
from .cluster import LOCAL_NODE
from ..tasks.classification.data import DatasetSplits, Split, hold_out, load_dataset
from .divergence import report_divergence, summary_lines
from ..tasks.classification.evaluation import CandidateEvaluator, EvaluationPayload, parent_fingerprint
from ..families import make_family
from ..tasks.classification.metrics import classification_metrics, diversity, ensemble_gain, growth_curve, reliability
from ..tasks.classification.models import build_model, count_parameters, load_parent_state, state_copy
from .problem import LOCAL_WORKER, make_problem, prepare_workers
from .progress import Steps, run_seconds, say, start_run_clock
from .faults import crash_point
from .logs import check_resume_compatible, load_population, read_run_config
from .rundir import create_run_dir, remove_stale_temp_files, write_json, write_population, write_run_config, write_state
from .search import (REFERENCE_GENERATION, ROOT_CANDIDATE, CandidateRecord, SubnetworkSearch, accept_members,
                     greedy_selection, rank_key, select_members)
from ..tasks.classification.training import predict_members, predict_probs, train

Progress = Callable[[str], None]


@dataclass
class RunResult:
    """What a run produced; everything here is also in ``run_dir``."""

    run_dir: Path
    metrics: dict
    population: pd.DataFrame
    member_genomes: list[str]


def _population_rows(records: list[CandidateRecord], family, members: list[int],
                     reference: CandidateRecord) -> list[dict]:
    """Rows of the population log: the parent's reference row (generation -1), then every candidate."""
    member_ids = set(members)
    rows = []
    for record in [reference, *records]:
        row = record.as_row()
        row["is_member"] = record.candidate in member_ids and record is not reference
        row.update(family.describe(record.genome))
        row["worker"] = "local" if record.worker == LOCAL_WORKER else f"actor-{record.worker}"
        rows.append(row)
    return rows


def _build_parent(cfg: RunConfig, data: DatasetSplits) -> torch.nn.Module:
    """The parent architecture, with the user's weights if given; fails fast on a bad model, layer
    pattern or parent file (before the run directory exists)."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    make_family(cfg.children).bind(build_model(cfg.model, data.input_shape, data.num_classes))
    if cfg.model.parent_path:
        load_parent_state(cfg.model.parent_path, model)
    return model


def _train_parent(cfg: RunConfig, model: torch.nn.Module, data: DatasetSplits, progress: Progress) -> None:
    if cfg.model.parent_path:
        progress(f"[parent] loaded {cfg.model.parent_path} ({count_parameters(model):,} parameters)")
        return
    progress(f"[parent] training {count_parameters(model):,} parameters for {cfg.parent.epochs} epochs "
             f"on {len(data.train):,} samples")

    def report(epoch: int, loss: float, seconds: float) -> None:
        val = classification_metrics(predict_probs(model, data.validation.x), data.validation.y)
        model.train()
        epochs.step(f"[parent] epoch {epoch + 1}/{cfg.parent.epochs}  loss {loss:.4f}  "
                    f"val acc {val['accuracy']:.4f}  val nll {val['nll']:.4f}  ({seconds:.1f}s)")

    with Steps(progress, cfg.parent.epochs, "[parent]", "epochs") as epochs:
        train(model, data.train, cfg.parent, seed=cfg.seed, on_epoch=report)


def _generation_line(search: SubnetworkSearch, cfg: RunConfig, seconds: float, check: dict) -> str:
    latest = [r for r in search.records if r.generation == search.generation - 1]
    ranked = sorted(latest, key=lambda r: rank_key(r, cfg.search.fitness))
    best, median, worst = ranked[0], ranked[len(ranked) // 2], ranked[-1]
    held = (f"  best on held-back: acc {check['holdout_accuracy']:.4f} nll {check['holdout_nll']:.4f}"
            if check["holdout_nll"] is not None else "")
    return (f"[search] generation {search.generation}/{cfg.search.generations}  val {cfg.search.fitness}: "
            f"best {best.fitness:.4f}  median {median.fitness:.4f}  worst {worst.fitness:.4f}  "
            f"elite best {search.elites[0].fitness if search.elites else math.nan:.4f}{held}  "
            f"step x{check['step_scale']:.2f}  "
            f"({len(latest)} candidates in {seconds:.1f}s, {len(latest) / seconds:.1f}/s)")


def _load_config_arg(config: RunConfig | dict | str | Path, overrides: list[str] | None) -> tuple[RunConfig, str]:
    if isinstance(config, dict):
        return config_from_dict(apply_overrides(copy.deepcopy(config), overrides or [])), "run"
    if isinstance(config, RunConfig):
        return config, "run"
    return load_config(config, overrides), Path(config).stem


def run(config: RunConfig | dict | str | Path, overrides: list[str] | None = None, *,
        progress: Progress = say) -> RunResult:
    """Run a whole search from a :class:`RunConfig`, a nested dict or a YAML path, plus ``key=value``
    overrides (not applied to a ready :class:`RunConfig`)."""
    start_run_clock()
    cfg, config_name = _load_config_arg(config, overrides)
    check_before_run(cfg)
    progress(f"[data] loading {cfg.data.name}")
    data = load_dataset(cfg.data)
    if cfg.method != "subnetworks":  # a matched-budget baseline: the same kind of run directory, no search
        from ..tasks.classification.baselines import check_baseline, run_baseline

        check_baseline(cfg, data)
        return run_baseline(cfg, create_run_dir(cfg, config_name), data, progress)
    parent = _build_parent(cfg, data)
    prepare_workers(cfg.workers, progress)  # Ray up and the actors placeable before training or the run dir
    run_dir = create_run_dir(cfg, config_name)
    return _execute(cfg, run_dir, data, parent, None, progress)


def resume(run_dir: str | Path, overrides: list[str] | None = None, *, progress: Progress = say) -> RunResult:
    """Go on with ``run_dir`` from its newest usable checkpoint.

    Compatible overrides: ``search.generations`` (to extend a search) and ``workers.*`` (actors, GPUs,
    cluster address); anything else would make it another run and is refused.
    """
    start_run_clock()
    run_dir = Path(run_dir)
    saved = read_run_config(run_dir)
    check_resume_compatible(saved, apply_overrides(copy.deepcopy(saved), overrides or []), run_dir)
    cfg = config_from_dict(apply_overrides(copy.deepcopy(saved), overrides or []))
    # Compared with its defaults filled in: fields added since the run started keep their defaults, which
    # reproduce what the run did before they existed.
    check_resume_compatible(config_to_dict(config_from_dict(saved)), config_to_dict(cfg), run_dir)
    check_address(cfg.workers)
    if cfg.method != "subnetworks":  # baselines keep no checkpoints; run again, they give the same result
        from ..tasks.classification.baselines import run_baseline

        return run_baseline(cfg, run_dir, load_dataset(cfg.data), progress)
    state = load_latest_checkpoint(run_dir, progress)
    if state is not None and state["search"] and cfg.search.generations < state["search"]["generation"]:
        raise ConfigError("search.generations", f"at least the {state['search']['generation']} generations "
                                                f"{run_dir} has already run", cfg.search.generations)
    data = load_dataset(cfg.data)
    parent = _build_parent(cfg, data)
    prepare_workers(cfg.workers, progress)
    for path in remove_stale_temp_files(run_dir):
        progress(f"[resume] removed {path.name}, left by an interrupted write")
    if cfg != config_from_dict(saved):
        write_run_config(run_dir, cfg)
    return _execute(cfg, run_dir, data, parent, state, progress)


def grow(run_dir: str | Path, members: int, *, generations: int = 1, progress: Progress = say) -> RunResult:
    """Add up to ``members`` members to a finished run: evolve ``generations`` more generations from where
    the search stopped, keep the current members and offer the best new distinct candidates to the
    ensemble (fine-tuned and accepted as in a run)."""
    start_run_clock()
    run_dir = Path(run_dir)
    if members < 1 or generations < 0:
        raise UserError(f"grow needs --members >= 1 and --generations >= 0 (got {members} and {generations})")
    method = read_run_config(run_dir).get("method", "subnetworks")
    if method != "subnetworks":
        raise UserError(f"{run_dir} is a {method} baseline run; only subnetwork runs can grow")
    state = load_latest_checkpoint(run_dir, progress)
    if state is None or state["stage"] != "done":
        raise RunDirError(f"{run_dir} has not finished; resume it first (evo-subens resume {run_dir})")
    cfg = config_from_dict(read_run_config(run_dir))
    accepted = _accepted(state)
    cfg.search.generations = state["search"]["generation"] + generations
    cfg.ensemble.size = len(accepted) + members
    data = load_dataset(cfg.data)
    parent = _build_parent(cfg, data)
    prepare_workers(cfg.workers, progress)
    write_run_config(run_dir, cfg)
    progress(f"[grow] {len(accepted)} members + up to {members} new, {generations} more generation(s)")
    # The user asked for more generations: an early stop of the search does not hold for them.
    search_state = dict(state["search"], stopped=False, stalled=0)
    grown = dict(state, stage="search", search=search_state, grow=members, accepted=accepted)
    return _execute(cfg, run_dir, data, parent, grown, progress)


def _accepted(state: dict) -> list[int]:
    """Positions (in ``state["members"]``) of the ensemble's members; checkpoints written before
    acceptance existed took every selected candidate."""
    accepted = state.get("accepted")
    return list(range(len(state["members"]))) if accepted is None else list(accepted)


def _execute(cfg: RunConfig, run_dir: Path, data: DatasetSplits, parent: torch.nn.Module,
             state: dict | None, progress: Progress) -> RunResult:
    """The pipeline from ``state`` (None: from the start) to metrics.json, checkpointing each stage.

    Stages: parent -> search (a checkpoint per generation) -> members (candidates selected, by position)
    -> finetune (a checkpoint per tuned member) -> accepted (the ensemble) -> done.
    """
    logging.getLogger("evotorch").setLevel(logging.WARNING)  # its per-problem INFO lines drown the progress
    selection, holdout = hold_out(data.validation, cfg.ensemble.holdout)
    progress(f"[run] {run_dir}")
    progress(f"[data] {data.name}: train {len(data.train):,}  validation {len(selection):,}"
             + (f" + {len(holdout):,} held back" if holdout is not None else "") + f"  test {len(data.test):,}")

    # Stage 1: the parent.
    if state is None:
        _train_parent(cfg, parent, data, progress)
        parent_state = state_copy(parent)
        write_state(run_dir / "parent.pt", parent_state)
        parent_id = parent_fingerprint(parent_state)
        state = {"stage": "parent", "parent_id": parent_id, "search": None, "members": [], "tuned": 0,
                 "accepted": None, "checks": []}
        _checkpoint(run_dir, cfg, state)
    else:
        load_parent_state(run_dir / "parent.pt", parent)
        parent_state = state_copy(parent)
        if parent_fingerprint(parent_state) != state["parent_id"]:
            raise RunDirError(f"{run_dir / 'parent.pt'} is not the parent this run's checkpoint was made with")
        set_rng_state(state["rng"])
    parent.eval()

    # Stage 2: the search, one checkpoint per generation.
    family = make_family(cfg.children)
    payload = EvaluationPayload(
        model=cfg.model, input_shape=data.input_shape, num_classes=data.num_classes, parent_state=parent_state,
        parent_id=state["parent_id"], children=cfg.children, val_x=selection.x, val_y=selection.y,
        batch_size=cfg.search.eval_batch_size, threads=cfg.workers.threads_per_actor,
        use_gpu=cfg.workers.num_gpus_per_actor > 0, activation_cache_mb=cfg.workers.activation_cache_mb,
        autocast=cfg.workers.autocast, stack_candidates=cfg.workers.stack_candidates,
        finetune=cfg.finetune if cfg.finetune.epochs else None)
    if family.trains_children or cfg.finetune.epochs:
        payload.train_x, payload.train_y = data.train.x, data.train.y
    driver = CandidateEvaluator(payload)  # builds members' weights here when they are cheap to rebuild
    reference = _reference_record(driver, family, state["parent_id"], cfg.search.fitness)
    progress(f"[parent] validation: accuracy {reference.val_accuracy:.4f}  nll {reference.val_nll:.4f}")
    population_path = run_dir / "population.parquet"
    problem = make_problem(cfg.workers, payload, fitness=cfg.search.fitness, population=cfg.search.population)
    search = SubnetworkSearch(problem, family, cfg.search, seed=cfg.seed, racing_rank=_racing_rank(cfg),
                              reference=reference)
    if state["search"]:
        search.load_state_dict(state["search"])
    searched = search.generation < cfg.search.generations and not search.stopped
    checks = list(state.get("checks", []))
    first_step = True
    members_so_far = _accepted(state) if state.get("grow") else []

    def states_of(chosen: list[CandidateRecord]) -> list[dict]:
        """Weights of candidates: fetched from the workers that trained them, else rebuilt here."""
        if family.trains_children:
            return problem.child_states([r.genome for r in chosen], [r.worker for r in chosen])
        return [driver.child_state(r.genome) for r in chosen]

    generations = Steps(progress, cfg.search.generations - search.generation, "[search]", "generations")
    try:
        while search.generation < cfg.search.generations and not search.stopped:
            step_started = time.perf_counter()
            search.step()
            seconds = time.perf_counter() - step_started
            checks.append(_generation_check(search, cfg, holdout, states_of, data))
            state = dict(state, stage="search", search=search.state_dict(), checks=checks,
                         **({} if state.get("grow") else {"members": [], "tuned": 0, "accepted": None}))
            _checkpoint(run_dir, cfg, state)
            rows = _population_rows(search.records, family, [], reference)
            write_population(population_path, rows, family.log_columns)
            if first_step:
                first_step = False
                devices = problem.worker_devices()
                where = "in-process" if problem.actors is None else f"{len(devices)} Ray actors"
                progress(f"[workers] evaluating {where} on {', '.join(sorted(set(devices)))}")
            for incident in search.incidents:
                if incident["generation"] == search.generation - 1:
                    progress(f"[workers] actor-{incident['worker']} was lost (pid {incident['lost_pid']}) and "
                             f"restarted; its unfinished candidates were evaluated again")
            generations.step(_generation_line(search, cfg, seconds, checks[-1]))
            report_divergence(rows, search.generation - 1, family, run_dir, progress)
            if search.stopped:
                progress(f"[search] stopped after generation {search.generation}: {cfg.search.patience} "
                         f"generation(s) without a better best candidate (search.patience)")
            crash_point("search.after_generation")

        generations.close()
        # Stage 3: select candidates (by position). Growing keeps every earlier position and adds new ones.
        starts: dict[int, dict] = {}  # weights of trained children fetched while their workers are up
        if state["stage"] in ("parent", "search") or searched:
            prior = [search.records[c] for c in state["members"]] if state.get("grow") else []
            count = state["grow"] if state.get("grow") else cfg.ensemble.size
            progress(f"[members] choosing {count} candidates ({cfg.ensemble.selection}) from "
                     f"{len(search.records):,} on the validation split")
            fresh, comparison = _select_members(cfg, data, selection, search.records, prior, count, states_of)
            if family.trains_children:
                for position, (member, member_state) in enumerate(zip(fresh, states_of(fresh)), start=len(prior)):
                    if cfg.finetune.epochs:
                        starts[position] = member_state
                    else:
                        _save_member(run_dir, position, family.pack(member_state, member.genome,
                                                                     driver.materialiser))
            settled = len(prior) + (len(fresh) if family.trains_children and not cfg.finetune.epochs else 0)
            state = dict(state, stage="members", members=[m.candidate for m in prior + fresh], tuned=settled,
                         accepted=members_so_far, decided=len(prior), grow=None,
                         selection=comparison if comparison is not None else state.get("selection"))
            _checkpoint(run_dir, cfg, state)

        # Stage 4: optimise: fine-tune the selected candidates in the workers, in parallel.
        chosen = [search.records[c] for c in state["members"]]
        if cfg.finetune.epochs and state["tuned"] < len(chosen):
            pending = range(state["tuned"], len(chosen))
            progress(f"[finetune] {len(pending)} member(s), {cfg.finetune.epochs} epoch(s) each, "
                     f"{'in-process' if problem.actors is None else f'on {len(problem.actors)} Ray actors'}")
            jobs = [(chosen[i].genome, _finetune_seed(cfg, i), starts.get(i)) for i in pending]
            with Steps(progress, len(pending), "[finetune]", "members") as tuning:
                for i, tuned in zip(pending, problem.finetune(jobs)):
                    _save_member(run_dir, i, family.pack(tuned, chosen[i].genome, driver.materialiser))
                    state = dict(state, stage="finetune", tuned=i + 1)
                    _checkpoint(run_dir, cfg, state)
                    tuning.step(f"[finetune] member {i + 1}/{len(chosen)} done")
                    crash_point("finetune.after_member")
    finally:
        generations.close()
        problem.close()
    stored = family.trains_children or cfg.finetune.epochs > 0
    member_files = [_member_file(i) if stored else None for i in range(len(chosen))]
    chosen_states = [_load_member(run_dir, i, family, m.genome, driver.materialiser) if stored
                     else driver.child_state(m.genome) for i, m in enumerate(chosen)]

    # Stage 5: acceptance on the validation split: a member joins only if it improves the ensemble.
    if state["stage"] != "done" and state.get("decided", 0) < len(chosen):
        accepted = list(state.get("accepted") or [])
        decided = state.get("decided", 0)
        if cfg.ensemble.acceptance:
            kept = _predict_states(cfg, data, [chosen_states[i] for i in accepted], selection.x)
            new = _predict_states(cfg, data, chosen_states[decided:], selection.x)
            joined = accept_members(kept, new, selection.y)
        else:
            joined = list(range(len(chosen) - decided))
        accepted += [decided + j for j in joined]
        rejected = len(chosen) - decided - len(joined)
        if rejected:
            progress(f"[ensemble] {len(joined)} of {len(chosen) - decided} fine-tuned candidates accepted; "
                     f"{rejected} would have raised the validation ensemble's NLL")
        state = dict(state, stage="accepted", accepted=accepted, decided=len(chosen))
        _checkpoint(run_dir, cfg, state)
    positions = _accepted(state)
    members = [chosen[i] for i in positions]
    member_states = [chosen_states[i] for i in positions]

    # Stage 6: the ensemble on the test split, touched only here, after every selection decision.
    write_population(population_path, _population_rows(search.records, family, [m.candidate for m in members],
                                                       reference), family.log_columns)
    write_json(run_dir / "members.json", [
        {"candidate": m.candidate, "genome": m.genome, "weights": member_files[i], "val_accuracy": m.val_accuracy,
         "val_nll": m.val_nll} for i, m in zip(positions, members)])
    write_json(run_dir / "incidents.json", search.incidents)
    progress(f"[test] parent, {len(members)} members and their ensemble on {len(data.test):,} test samples")
    metrics, test_probs = _test_metrics(cfg, data, parent, member_states, members)
    metrics.update(_validation_metrics(cfg, data, selection, holdout, parent, member_states, metrics, test_probs))
    metrics["search"] = _search_summary(search, checks, cfg)
    metrics["rejected"] = [chosen[i].candidate for i in range(len(chosen)) if i not in set(positions)]
    if state.get("selection"):
        metrics["selection"] = state["selection"]
    metrics["method"] = "subnetworks"
    metrics["cost"] = subnetwork_cost(cfg, data, candidates=len(search.records), selected=len(chosen),
                                      members=len(members), validation=len(selection))
    metrics["verdict"] = _verdict(metrics)
    write_json(run_dir / "metrics.json", metrics)
    _checkpoint(run_dir, cfg, dict(state, stage="done", grow=None))
    progress(_summary_table(metrics, len(chosen)))
    final_rows = _population_rows(search.records, family, [m.candidate for m in members], reference)
    for line in summary_lines([r for r in final_rows if r["generation"] >= 0], data.num_classes, family):
        progress(line)
    for line in _warnings(metrics):
        progress(line)
    progress(f"[run] results in {run_dir} ({run_seconds():.0f}s)")
    return RunResult(run_dir, metrics, load_population(run_dir), [m.genome for m in members])


def _reference_record(driver: CandidateEvaluator, family, parent_id: str, fitness: str) -> CandidateRecord:
    """The trained parent scored like a candidate, on the same validation split: the reference row of the
    population log and what generation 0's children are compared with."""
    root = family.root(parent_id)
    score = driver.evaluate(root)
    value = score.accuracy if fitness == "accuracy" else score.nll
    return CandidateRecord(REFERENCE_GENERATION, ROOT_CANDIDATE, ROOT_CANDIDATE, root, value, score.accuracy,
                           score.nll, 0.0, LOCAL_WORKER, node=LOCAL_NODE)


def _generation_check(search: SubnetworkSearch, cfg: RunConfig, holdout: Split | None, states_of,
                      data: DatasetSplits) -> dict:
    """The best candidate of the generation just evaluated, with its metrics on the held-back validation
    part (None without one): whether later generations beat generation 0 on data no decision saw."""
    latest = [r for r in search.records if r.generation == search.generation - 1]
    best = min(latest, key=lambda r: rank_key(r, cfg.search.fitness))
    check = {"generation": best.generation, "candidate": best.candidate, "val_accuracy": best.val_accuracy,
             "val_nll": best.val_nll, "holdout_accuracy": None, "holdout_nll": None,
             "step_scale": search.history[-1]["step_scale"] if search.history else 1.0,
             "success_rate": search.history[-1]["success_rate"] if search.history else None}
    if holdout is not None and not math.isnan(best.val_nll):
        probs = _predict_states(cfg, data, states_of([best]), holdout.x)[0]
        held = classification_metrics(probs, holdout.y)
        check.update(holdout_accuracy=held["accuracy"], holdout_nll=held["nll"])
    return check


def _search_summary(search: SubnetworkSearch, checks: list[dict], cfg: RunConfig) -> dict:
    """Per generation: the best candidate on validation and held-back validation, the step scale and the
    1/5 success rate; whether a later generation beat generation 0 on held-back data; early stop."""
    later = None
    held = [c for c in checks if c["holdout_nll"] is not None]
    if len(held) > 1:
        key = "holdout_accuracy" if cfg.search.fitness == "accuracy" else "holdout_nll"
        sign = -1 if cfg.search.fitness == "accuracy" else 1
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


def _select_members(cfg: RunConfig, data: DatasetSplits, selection: Split, records: list[CandidateRecord],
                    prior: list[CandidateRecord], count: int, states_of) -> tuple[list, dict | None]:
    """``count`` new candidates to offer the ensemble (distinct from ``prior``), and the comparison of both
    selection rules (None when growing).

    Selection uses the validation split only (its selection part). The comparison (each rule's ensemble,
    before fine-tuning, on validation and test) is made once both rules have chosen, so the test split
    cannot influence either choice. A grown ensemble adds the best new candidates by fitness.
    """
    fitness = cfg.search.fitness
    if prior:
        return select_members(records, len(prior) + count, fitness, prior)[len(prior):], None
    topk = select_members(records, count, fitness)
    pool = select_members(records, cfg.ensemble.pool or 4 * count, fitness)
    candidates = list({r.candidate: r for r in pool + topk}.values())
    states = dict(zip((r.candidate for r in candidates), states_of(candidates)))

    def outputs(chosen: list[CandidateRecord], split: Split) -> dict[int, torch.Tensor]:
        """Probabilities on ``split`` of each distinct candidate in ``chosen``, each predicted once."""
        distinct = list({r.candidate: r for r in chosen})
        return dict(zip(distinct, _predict_states(cfg, data, [states[c] for c in distinct], split.x)))

    validation = outputs(candidates, selection)
    greedy = [pool[j] for j in greedy_selection([validation[r.candidate] for r in pool], selection.y, count)]
    chosen = {"topk": topk, "greedy": greedy}
    predicted = {"validation": (validation, selection), "test": (outputs(topk + greedy, data.test), data.test)}
    comparison = {}
    for rule, ensemble in chosen.items():
        comparison[rule] = {"candidates": [r.candidate for r in ensemble]}
        for name, (probs, split) in predicted.items():
            ensemble_probs = torch.stack([probs[r.candidate] for r in ensemble]).mean(dim=0)
            comparison[rule][name] = classification_metrics(ensemble_probs, split.y)
    return chosen[cfg.ensemble.selection], comparison


def _predict_states(cfg: RunConfig, data: DatasetSplits, states: list[dict], x: torch.Tensor) -> list[torch.Tensor]:
    """Each weight set's probabilities on ``x`` (no penultimate features: only diversity needs them)."""
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    return predict_members(model, states, x, cfg.search.eval_batch_size, features=False)[0]


def _member_outputs(cfg: RunConfig, data: DatasetSplits, states: list[dict],
                    x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each member's probabilities and penultimate features on ``x``."""
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    return predict_members(model, states, x, cfg.search.eval_batch_size)


def _checkpoint(run_dir: Path, cfg: RunConfig, state: dict) -> None:
    save_checkpoint(run_dir, dict(state, config=config_to_dict(cfg)))


def _member_file(index: int) -> str:
    return f"members/{index}.pt"


def _save_member(run_dir: Path, index: int, packed: dict) -> None:
    (run_dir / "members").mkdir(exist_ok=True)
    write_state(run_dir / _member_file(index), packed)


def _load_member(run_dir: Path, index: int, family, genome: str, materialiser) -> dict:
    packed = torch.load(run_dir / _member_file(index), map_location="cpu", weights_only=True)
    return family.unpack(packed, genome, materialiser)


def _finetune_seed(cfg: RunConfig, position: int) -> int:
    """Seed of the fine-tuning of the candidate selected at ``position``: a function of the run seed and the
    position, whichever worker tunes it."""
    return cfg.seed + 1 + position


def _test_metrics(cfg: RunConfig, data: DatasetSplits, parent: torch.nn.Module, member_states: list[dict],
                  members: list[CandidateRecord]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Test metrics of parent, members and ensemble, and the parent's and ensemble's test probabilities
    (for temperature scaling)."""
    test_x, test_y = data.test.x, data.test.y
    batch = cfg.search.eval_batch_size
    member_probs, member_features = _member_outputs(cfg, data, member_states, test_x)
    ensemble_probs = torch.stack(member_probs).mean(dim=0)
    parent_probs = predict_probs(parent, test_x, batch)
    return {
        "parent": classification_metrics(parent_probs, test_y),
        "ensemble": classification_metrics(ensemble_probs, test_y),
        "reliability": {"parent": reliability(parent_probs, test_y), "ensemble": reliability(ensemble_probs, test_y)},
        "members": [dict(classification_metrics(p, test_y), candidate=m.candidate)
                    for p, m in zip(member_probs, members)],
        "growth": growth_curve(member_probs, test_y),
        "diversity": diversity(member_probs, member_features),
        "test_samples": len(test_y),
    }, {"parent": parent_probs, "ensemble": ensemble_probs}


def _validation_metrics(cfg: RunConfig, data: DatasetSplits, selection: Split, holdout: Split | None,
                        parent: torch.nn.Module, member_states: list[dict], test: dict,
                        test_probs: dict[str, torch.Tensor]) -> dict:
    """Validation metrics of parent and ensemble (selection part and held-back part), temperature scaling
    fitted on the whole validation split, and the ensemble's gain over the parent split into member cost
    and diversity (test, and held-back validation)."""
    x, y = data.validation.x, data.validation.y
    parent_probs = predict_probs(parent, x, cfg.search.eval_batch_size)
    member_probs = _predict_states(cfg, data, member_states, x)
    ensemble_probs = torch.stack(member_probs).mean(dim=0)
    n = len(selection)  # hold_out keeps the head of the validation split for decisions, the tail held back

    def part(probs: torch.Tensor, held: bool) -> dict:
        return classification_metrics(probs[n:], y[n:]) if held else classification_metrics(probs[:n], y[:n])

    out = {"validation": {"parent": part(parent_probs, False), "ensemble": part(ensemble_probs, False),
                          "samples": n},
           "holdout": None,
           "temperature": {"parent": temperature_scaled(parent_probs, y, test_probs["parent"], data.test.y),
                           "ensemble": temperature_scaled(ensemble_probs, y, test_probs["ensemble"], data.test.y)},
           "gain": {"test": ensemble_gain(test["parent"], test["members"], test["ensemble"]), "holdout": None}}
    if holdout is not None:
        out["holdout"] = {"parent": part(parent_probs, True), "ensemble": part(ensemble_probs, True),
                          "samples": len(holdout)}
        out["gain"]["holdout"] = ensemble_gain(out["holdout"]["parent"], [part(p, True) for p in member_probs],
                                               out["holdout"]["ensemble"])
    return out


def _difference(parent: dict, ensemble: dict) -> dict:
    """Accuracy difference (points) and relative NLL change of the ensemble against the parent."""
    accuracy = 100 * (ensemble["accuracy"] - parent["accuracy"])
    change = (ensemble["nll"] - parent["nll"]) / parent["nll"] if parent["nll"] > 0 else 0.0
    # On a few hundred held-back samples accuracy often ties; a tie with a lower NLL is not a loss.
    return {"accuracy_points": accuracy, "nll_change": change, "beats_parent": accuracy >= 0 and change < 0}


def _verdict(metrics: dict) -> dict:
    """Ensemble vs parent on test and on held-back validation (None without one)."""
    held = metrics.get("holdout")
    return {"test": _difference(metrics["parent"], metrics["ensemble"]),
            "holdout": _difference(held["parent"], held["ensemble"]) if held else None}


def _describe_difference(difference: dict) -> str:
    return f"accuracy {difference['accuracy_points']:+.2f} pt, NLL {100 * difference['nll_change']:+.1f}%"


def _warnings(metrics: dict) -> list[str]:
    """Loud lines for a run whose ensemble is no better than its parent on held-back validation (or, without
    a held-back part, on test)."""
    verdict = metrics["verdict"]
    checked, where = (verdict["holdout"], "held-back validation") if verdict["holdout"] else \
        (verdict["test"], "the test split")
    if checked["beats_parent"]:
        return []
    return [f"WARNING: the ensemble does not beat its parent on {where} ({_describe_difference(checked)}); "
            f"see 'gain' in metrics.json: fine-tuning members (finetune.epochs) or a different child family may "
            f"help"]


def _summary_table(metrics: dict, offered: int) -> str:
    best = metrics["members"][0]
    scaled = metrics["temperature"]
    rows = [("parent", metrics["parent"], scaled["parent"]["test"]), ("best member", best, None),
            (f"ensemble ({len(metrics['members'])}/{offered})", metrics["ensemble"], scaled["ensemble"]["test"])]
    lines = [f"{'test split':<18}{'accuracy':>10}{'nll':>10}{'ece':>10}{'nll (TS)':>10}{'ece (TS)':>10}"]
    for name, m, ts in rows:
        cells = f"{ts['nll']:>10.4f}{ts['ece']:>10.4f}" if ts else f"{'':>20}"
        lines.append(f"{name:<18}{m['accuracy']:>10.4f}{m['nll']:>10.4f}{m['ece']:>10.4f}{cells}")
    spread = metrics["diversity"]
    lines.append(f"member diversity: disagreement {spread['disagreement']['mean']:.4f}  "
                 f"KL {spread['kl']['mean']:.4f}  output corr {spread['correlation']['mean']:.4f}  "
                 f"feature CKA {spread['cka']['mean']:.4f}")
    gain = metrics["gain"]["test"]["nll"]
    lines.append(f"NLL gain over the parent {gain['gain']:+.4f} = diversity {gain['diversity']:+.4f} "
                 f"- member cost {gain['member_cost']:+.4f} (mean member {gain['mean_member']:.4f})")
    search = metrics["search"]
    if search["later_generations_beat_first"] is not None:
        lines.append(f"search: {search['generations_run']} generation(s)"
                     + (", stopped early" if search["stopped_early"] else "")
                     + ("; a later generation's best beat generation 0's on held-back validation"
                        if search["later_generations_beat_first"] else
                        "; no later generation's best beat generation 0's on held-back validation"))
    verdict = metrics["verdict"]
    line = f"verdict: ensemble vs parent on test: {_describe_difference(verdict['test'])}"
    if verdict["holdout"]:
        line += f"; on held-back validation: {_describe_difference(verdict['holdout'])}"
    lines.append(line)
    return "\n".join(lines)
