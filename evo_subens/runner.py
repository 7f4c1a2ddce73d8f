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
from .errors import ConfigError, RunDirError, UserError
from .data import DatasetSplits, load_dataset
from .divergence import report_divergence, summary_lines
from .evaluation import CandidateEvaluator, EvaluationPayload, parent_fingerprint
from .families import make_family
from .metrics import classification_metrics, diversity, growth_curve, reliability
from .models import build_model, count_parameters, load_parent_state, state_copy
from .problem import LOCAL_WORKER, make_problem, prepare_workers
from .progress import Steps, run_seconds, say, start_run_clock
from .faults import crash_point
from .logs import check_resume_compatible, load_population, read_run_config
from .rundir import create_run_dir, remove_stale_temp_files, write_json, write_population, write_run_config, write_state
from .search import CandidateRecord, SubnetworkSearch, greedy_selection, rank_key, select_members
from .training import predict_members, predict_probs, train

Progress = Callable[[str], None]


@dataclass
class RunResult:
    """What a run produced; everything here is also in ``run_dir``."""

    run_dir: Path
    metrics: dict
    population: pd.DataFrame
    member_genomes: list[str]


def _population_rows(records: list[CandidateRecord], family, members: list[int]) -> list[dict]:
    member_ids = set(members)
    rows = []
    for record in records:
        row = record.as_row()
        row["is_member"] = record.candidate in member_ids
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


def _generation_line(search: SubnetworkSearch, cfg: RunConfig, seconds: float) -> str:
    latest = [r for r in search.records if r.generation == search.generation - 1]
    ranked = sorted(latest, key=lambda r: rank_key(r, cfg.search.fitness))
    best, median, worst = ranked[0], ranked[len(ranked) // 2], ranked[-1]
    return (f"[search] generation {search.generation}/{cfg.search.generations}  val {cfg.search.fitness}: "
            f"best {best.fitness:.4f}  median {median.fitness:.4f}  worst {worst.fitness:.4f}  "
            f"elite best {search.elites[0].fitness if search.elites else math.nan:.4f}  "
            f"({len(latest)} candidates in {seconds:.1f}s, {len(latest) / seconds:.1f}/s)")


def _summary_table(metrics: dict) -> str:
    best = metrics["members"][0]
    rows = [("parent", metrics["parent"]), ("best member", best),
            (f"ensemble ({len(metrics['members'])})", metrics["ensemble"])]
    lines = [f"{'test split':<16}{'accuracy':>10}{'nll':>10}{'ece':>10}"]
    lines += [f"{name:<16}{m['accuracy']:>10.4f}{m['nll']:>10.4f}{m['ece']:>10.4f}" for name, m in rows]
    spread = metrics["diversity"]
    lines.append(f"member diversity: disagreement {spread['disagreement']['mean']:.4f}  "
                 f"KL {spread['kl']['mean']:.4f}  output corr {spread['correlation']['mean']:.4f}  "
                 f"feature CKA {spread['cka']['mean']:.4f}")
    return "\n".join(lines)


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
        from .baselines import check_baseline, run_baseline

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
    cfg = config_from_dict(apply_overrides(copy.deepcopy(saved), overrides or []))
    # Compared with its defaults filled in: fields added since the run started keep their defaults, which
    # reproduce what the run did before they existed.
    check_resume_compatible(config_to_dict(config_from_dict(saved)), config_to_dict(cfg), run_dir)
    check_address(cfg.workers)
    if cfg.method != "subnetworks":  # baselines keep no checkpoints; run again, they give the same result
        from .baselines import run_baseline

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
    """Add ``members`` members to a finished run: evolve ``generations`` more generations from where the
    search stopped, keep the current members and add the best new distinct candidates."""
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
    cfg.search.generations = state["search"]["generation"] + generations
    cfg.ensemble.size = len(state["members"]) + members
    data = load_dataset(cfg.data)
    parent = _build_parent(cfg, data)
    prepare_workers(cfg.workers, progress)
    write_run_config(run_dir, cfg)
    progress(f"[grow] {len(state['members'])} -> {cfg.ensemble.size} members, "
             f"{generations} more generation(s)")
    grown = dict(state, stage="search", keep=state["members"], keep_tuned=state["tuned"])
    return _execute(cfg, run_dir, data, parent, grown, progress)


def _execute(cfg: RunConfig, run_dir: Path, data: DatasetSplits, parent: torch.nn.Module,
             state: dict | None, progress: Progress) -> RunResult:
    """The pipeline from ``state`` (None: from the start) to metrics.json, checkpointing each stage."""
    logging.getLogger("evotorch").setLevel(logging.WARNING)  # its per-problem INFO lines drown the progress
    progress(f"[run] {run_dir}")
    progress(f"[data] {data.name}: train {len(data.train):,}  validation {len(data.validation):,}  "
             f"test {len(data.test):,}")

    # Stage 1: the parent.
    if state is None:
        _train_parent(cfg, parent, data, progress)
        parent_state = state_copy(parent)
        write_state(run_dir / "parent.pt", parent_state)
        parent_id = parent_fingerprint(parent_state)
        state = {"stage": "parent", "parent_id": parent_id, "search": None, "members": [], "tuned": 0}
        _checkpoint(run_dir, cfg, state)
    else:
        load_parent_state(run_dir / "parent.pt", parent)
        parent_state = state_copy(parent)
        if parent_fingerprint(parent_state) != state["parent_id"]:
            raise RunDirError(f"{run_dir / 'parent.pt'} is not the parent this run's checkpoint was made with")
        set_rng_state(state["rng"])
    parent.eval()

    # Stage 2: the search, one checkpoint per generation.
    payload = EvaluationPayload(
        model=cfg.model, input_shape=data.input_shape, num_classes=data.num_classes, parent_state=parent_state,
        parent_id=state["parent_id"], children=cfg.children, val_x=data.validation.x, val_y=data.validation.y,
        batch_size=cfg.search.eval_batch_size, threads=cfg.workers.threads_per_actor,
        use_gpu=cfg.workers.num_gpus_per_actor > 0, activation_cache_mb=cfg.workers.activation_cache_mb,
        autocast=cfg.workers.autocast, stack_candidates=cfg.workers.stack_candidates)
    family = make_family(cfg.children)
    if family.trains_children:
        payload.train_x, payload.train_y = data.train.x, data.train.y
    driver = CandidateEvaluator(payload)  # builds members' weights here when they are cheap to rebuild
    population_path = run_dir / "population.parquet"
    problem = make_problem(cfg.workers, payload, fitness=cfg.search.fitness, population=cfg.search.population)
    search = SubnetworkSearch(problem, family, cfg.search, seed=cfg.seed, racing_rank=_racing_rank(cfg))
    if state["search"]:
        search.load_state_dict(state["search"])
    searched = search.generation < cfg.search.generations
    # Growing keeps the current members (and their tuned weights); other searches select afresh. The
    # checkpoints carry what to keep, so a grow that is killed and resumed keeps them too.
    keep_ids, keep_tuned = state.get("keep", []), state.get("keep_tuned", 0)
    first_step = True
    generations = Steps(progress, cfg.search.generations - search.generation, "[search]", "generations")
    try:
        while search.generation < cfg.search.generations:
            step_started = time.perf_counter()
            search.step()
            seconds = time.perf_counter() - step_started
            state = dict(state, stage="search", search=search.state_dict(), members=[], tuned=0)
            _checkpoint(run_dir, cfg, state)
            rows = _population_rows(search.records, family, state["members"])
            write_population(population_path, rows)
            if first_step:
                first_step = False
                devices = problem.worker_devices()
                where = "in-process" if problem.actors is None else f"{len(devices)} Ray actors"
                progress(f"[workers] evaluating {where} on {', '.join(sorted(set(devices)))}")
            for incident in search.incidents:
                if incident["generation"] == search.generation - 1:
                    progress(f"[workers] actor-{incident['worker']} was lost (pid {incident['lost_pid']}) and "
                             f"restarted; its unfinished candidates were evaluated again")
            generations.step(_generation_line(search, cfg, seconds))
            report_divergence(rows, search.generation - 1, cfg.children, run_dir, progress)
            crash_point("search.after_generation")

        generations.close()
        # Stage 3: members. A grown ensemble keeps its members; an extended search selects afresh.
        if state["stage"] in ("parent", "search") or searched:
            keep = [search.records[i] for i in keep_ids]
            progress(f"[members] choosing {cfg.ensemble.size} members ({cfg.ensemble.selection}) from "
                     f"{len(search.records):,} candidates on the validation split")
            members, fresh_states, comparison = _select_members(cfg, data, search.records, keep, family,
                                                                problem, driver)
            if family.trains_children:  # trained weights were fetched from the workers while they are up
                for i, (member, member_state) in enumerate(zip(members[len(keep):], fresh_states),
                                                           start=len(keep)):
                    _save_member(run_dir, i, family.pack(member_state, member.genome, driver.materialiser))
            state = dict(state, stage="members", members=[m.candidate for m in members], tuned=keep_tuned,
                         selection=comparison)
            _checkpoint(run_dir, cfg, state)
    finally:
        generations.close()
        problem.close()
    members = [search.records[i] for i in state["members"]]
    member_files: list[str | None] = []
    member_states = []
    for i, member in enumerate(members):
        stored = family.trains_children or i < state["tuned"]
        member_files.append(_member_file(i) if stored else None)
        member_states.append(_load_member(run_dir, i, family, member.genome, driver.materialiser) if stored
                             else driver.child_state(member.genome))

    # Stage 4: optional fine-tuning, one checkpoint per member.
    if cfg.finetune.epochs > 0:
        for i in range(state["tuned"], len(members)):
            constraint = family.constraint(members[i].genome, driver.materialiser)
            member_states[i] = _finetune_member(cfg, data, member_states[i], i, constraint)
            _save_member(run_dir, i, family.pack(member_states[i], members[i].genome, driver.materialiser))
            member_files[i] = _member_file(i)
            state = dict(state, stage="finetune", tuned=i + 1)
            _checkpoint(run_dir, cfg, state)
            progress(f"[finetune] member {i + 1}/{len(members)} done")
            crash_point("finetune.after_member")

    # Stage 5: the ensemble on the test split, touched only here, after every selection decision.
    write_population(population_path, _population_rows(search.records, family, state["members"]))
    write_json(run_dir / "members.json", [
        {"candidate": m.candidate, "genome": m.genome, "weights": f, "val_accuracy": m.val_accuracy,
         "val_nll": m.val_nll} for m, f in zip(members, member_files)])
    write_json(run_dir / "incidents.json", search.incidents)
    progress(f"[test] parent, {len(members)} members and their ensemble on {len(data.test):,} test samples")
    metrics = _test_metrics(cfg, data, parent, member_states, members)
    if state.get("selection"):
        metrics["selection"] = state["selection"]
    metrics["method"] = "subnetworks"
    metrics["cost"] = subnetwork_cost(cfg, data, candidates=len(search.records), members=len(members))
    write_json(run_dir / "metrics.json", metrics)
    _checkpoint(run_dir, cfg, dict(state, stage="done", keep=[], keep_tuned=0))
    progress(_summary_table(metrics))
    for line in summary_lines(_population_rows(search.records, family, state["members"]), data.num_classes):
        progress(line)
    progress(f"[run] results in {run_dir} ({run_seconds():.0f}s)")
    return RunResult(run_dir, metrics, load_population(run_dir), [m.genome for m in members])


def _racing_rank(cfg: RunConfig) -> int:
    """How many of the best candidates racing must never stop: the elites and whatever ensemble selection
    draws from (0 when racing is off)."""
    if not cfg.search.racing:
        return 0
    drawn = cfg.ensemble.size if cfg.ensemble.selection == "topk" else cfg.ensemble.pool or 4 * cfg.ensemble.size
    return max(cfg.search.elites, drawn)


def _select_members(cfg: RunConfig, data: DatasetSplits, records: list[CandidateRecord],
                    keep: list[CandidateRecord], family, problem, driver) -> tuple[list, list[dict], dict | None]:
    """Members (after ``keep``), the weights of the newly selected ones where they are not cheap to
    rebuild, and the comparison of both selection rules.

    Selection uses the validation split only. The comparison (each rule's ensemble on validation and
    test) is made once both rules have chosen, so the test split cannot influence either choice. A grown
    ensemble keeps its members and adds the best new candidates by fitness (no comparison).
    """

    def states_of(chosen: list[CandidateRecord]) -> list[dict]:
        if family.trains_children:
            return problem.child_states([r.genome for r in chosen], [r.worker for r in chosen])
        return [driver.child_state(r.genome) for r in chosen]

    size, fitness = cfg.ensemble.size, cfg.search.fitness
    if keep:
        members = select_members(records, size, fitness, keep)
        fresh = members[len(keep):]
        return members, states_of(fresh) if family.trains_children else [], None
    topk = select_members(records, size, fitness)
    pool = select_members(records, cfg.ensemble.pool or 4 * size, fitness)
    candidates = list({r.candidate: r for r in pool + topk}.values())
    states = dict(zip((r.candidate for r in candidates), states_of(candidates)))

    def outputs(chosen: list[CandidateRecord], split: str) -> dict[int, torch.Tensor]:
        """Probabilities on ``split`` of each distinct candidate in ``chosen``, each predicted once."""
        distinct = list({r.candidate: r for r in chosen})
        probs, _ = _member_outputs(cfg, data, [states[c] for c in distinct], getattr(data, split).x)
        return dict(zip(distinct, probs))

    validation = outputs(candidates, "validation")
    greedy = [pool[j] for j in greedy_selection([validation[r.candidate] for r in pool], data.validation.y, size)]
    chosen = {"topk": topk, "greedy": greedy}
    predicted = {"validation": validation, "test": outputs(topk + greedy, "test")}
    comparison = {}
    for rule, ensemble in chosen.items():
        comparison[rule] = {"candidates": [r.candidate for r in ensemble]}
        for split, probs in predicted.items():
            ensemble_probs = torch.stack([probs[r.candidate] for r in ensemble]).mean(dim=0)
            comparison[rule][split] = classification_metrics(ensemble_probs, getattr(data, split).y)
    members = chosen[cfg.ensemble.selection]
    return members, [states[r.candidate] for r in members] if family.trains_children else [], comparison


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


def _finetune_member(cfg: RunConfig, data: DatasetSplits, state: dict, index: int,
                     constraint: Callable[[torch.nn.Module], None] | None) -> dict:
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    model.load_state_dict(state)
    torch.manual_seed(cfg.seed + 1 + index)  # each member's tuning is a function of the run seed and its index
    train(model, data.train, cfg.finetune, seed=cfg.seed + 1 + index, parameter_filter=constraint)
    return state_copy(model)


def _test_metrics(cfg: RunConfig, data: DatasetSplits, parent: torch.nn.Module, member_states: list[dict],
                  members: list[CandidateRecord]) -> dict:
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
    }
