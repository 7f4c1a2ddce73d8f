"""``evo-subens report``: a run directory (or a folder of runs) as ``report.md`` with PNG plots.

For one run: test metrics of parent, best member and ensemble (with cost where recorded), the two
ensemble-selection rules side by side, fitness per generation, accuracy and NLL against ensemble size,
member diversity heatmaps, a reliability diagram (parent vs ensemble), a feature-visualisation grid
(the same randomly chosen penultimate units in the parent and every member) and the sections only the
run's child family has (``Family.report_sections``, e.g. a plot over its own population-log columns).
For a folder: a report per run and one table over all of them, runs that differ only in their seed
grouped as mean +- standard error.

    >>> from evo_subens.report.run_report import write_report
    >>> write_report("runs/default-s0-20261126-033727")   # -> runs/default-s0-.../report.md
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from ..core.config import config_from_dict
from ..ensemble import Ensemble, load_ensemble
from ..errors import RunDirError
from ..core.worker import torch_threads
from ..families import Family, make_family
from .featvis import maximise_units, pick_units, starting_inputs, unit_activations
from ..core.logs import load_population, read_run_config
from ..tasks.classification.data import Split, load_dataset
from ..tasks.classification.results import OUTCOME_WORDS, percent
from ..tasks.classification.splits import hold_out
from .fitness import fitness_plot, search_extent
from .fitness import save_figure as _save
from ..tasks.classification.task import check_recorded_data
from ..tasks.classification.metrics import classification_metrics
from ..core.progress import Steps, say
from ..core.rundir import atomic_write
from ..tasks.classification.training import predict_probs

Progress = Callable[[str], None]
FEATURE_UNITS = 6
FEATURE_MEMBERS = 8  # grid rows after the parent; more members make the grid unreadable
DIVERSITY_PANELS = [("disagreement", "disagreement (PDR)"), ("kl", "KL divergence"),
                    ("correlation", "output correlation"), ("cka", "feature linear CKA")]


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a finished run (its config and test metrics)."""
    return (path / "config.yaml").is_file() and (path / "metrics.json").is_file()


def write_report(path: str | Path, *, features: bool = True, progress: Progress = say) -> Path:
    """Write ``report.md`` and its PNGs for a run directory, or for every run in a folder plus a summary.

    ``features=False`` skips the feature visualisation (the only part that runs the models at length).
    Returns the path of the (summary) report.
    """
    path = Path(path)
    if is_run_dir(path):
        return _run_report(path, features, progress)
    if not path.is_dir():
        raise RunDirError(f"{path} is neither a run directory nor a folder of runs")
    runs = sorted(p for p in path.iterdir() if p.is_dir() and is_run_dir(p))
    if not runs:
        raise RunDirError(f"{path} holds no finished run (a folder with config.yaml and metrics.json)")
    for run_dir in runs:
        _run_report(run_dir, features, progress)
    return _folder_report(path, runs, progress)


def read_metrics(run_dir: Path) -> dict:
    """A run's ``metrics.json``; :class:`RunDirError` naming the file when it is not a JSON object."""
    path = Path(run_dir) / "metrics.json"
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{path} is not valid JSON ({exc}); a finished run writes it last, so run "
                          f"evo-subens resume {run_dir} to write it again") from None
    if not isinstance(metrics, dict):
        raise RunDirError(f"{path} holds a {type(metrics).__name__}; expected the run's metrics (a JSON object)")
    return metrics


# ---------------------------------------------------------------------------------------------- one run

def _run_report(run_dir: Path, features: bool, progress: Progress) -> Path:
    progress(f"[report] {run_dir}")
    config = read_run_config(run_dir)
    metrics = read_metrics(run_dir)
    if config.get("task", "classification") == "rl":
        from .rl_report import rl_report

        return rl_report(run_dir, config, metrics)
    population = load_population(run_dir) if (run_dir / "population.parquet").is_file() else None
    ensemble = load_ensemble(run_dir) if features or population is not None else None
    # The parent's validation score and the feature grid's starting inputs come from the run's data splits,
    # in the form the models were trained on.
    data = load_dataset(ensemble.config.data) if ensemble is not None else None
    if data is not None:
        check_recorded_data(run_dir, data)
    method = metrics.get("method") or config.get("method") or "subnetworks"
    family = make_family(config_from_dict(config).children) if method == "subnetworks" else None
    lines = [f"# {run_dir.name}", "", _describe_config(config, metrics, family, population), ""]
    lines += ["## Test split", "", *_metrics_table(metrics), ""]
    if metrics.get("cost"):
        lines += ["Cost: " + ", ".join(f"{k.replace('_', ' ')} {v:,g}" for k, v in metrics["cost"].items()), ""]
    if metrics.get("gain"):
        lines += ["## Ensemble vs parent", "", *_gain_section(metrics), ""]
    if metrics.get("selection"):
        lines += ["## Ensemble selection", "", *_selection_table(metrics, config), ""]
    if population is not None:
        fitness, rows = config["search"]["fitness"], _selection_rows(metrics)
        # Tuned scoring fine-tunes the parent's reference row like every candidate: the parent itself is then
        # scored here, as is the parent of a log without a reference row, on the rows the candidates saw.
        tuned = config["search"].get("scoring") == "tuned" and family is not None and not family.trains_children
        parent_fitness = None
        if ((tuned or not (population["generation"] < 0).any()) and ensemble is not None
                and ensemble.parent is not None):
            selection, _ = hold_out(data.validation, config["ensemble"].get("holdout", 0.0))
            parent_fitness = _parent_validation(ensemble.parent, selection, fitness)
        notes = fitness_plot(population, fitness, parent_fitness, run_dir / "fitness.png",
                             planned=config["search"]["generations"],
                             stopped_early=bool((metrics.get("search") or {}).get("stopped_early")), rows=rows,
                             tuned_reference=tuned)
        lines += ["## Search", "", (f"Validation {fitness} of each generation's candidates on the {rows}; the dashed "
                  "line is the parent on the same rows."), *notes, "",
                  "![fitness per generation](fitness.png)", ""]
        lines += _ensemble_by_generation(metrics)
        for section in family.report_sections(population) if family is not None else []:
            lines += [f"## {section.title}", "", *section.lines, ""]
            for name, figure in section.plots.items():
                _save(figure, run_dir / name)
                lines += [f"![{section.title.lower()}]({name})", ""]
    if metrics.get("growth"):
        _growth_plot(metrics, run_dir / "growth.png")
        lines += ["## Ensemble size", "", "Test metrics of the ensemble of the first k members, in selection order.",
                  "", "![accuracy and NLL vs ensemble size](growth.png)", ""]
    lines += _diversity_section(metrics, run_dir)
    if metrics.get("reliability"):
        _reliability_plot(metrics["reliability"], run_dir / "reliability.png")
        lines += ["## Calibration", "", ("Accuracy against confidence in 15 equal-width bins (test split); the "
                  "diagonal is perfect calibration."), "", "![reliability diagram](reliability.png)", ""]
    if metrics.get("packed"):
        lines += ["## Packed ensemble", "", *_packed_section(metrics["packed"]), ""]
    if features and ensemble is not None and method == "packed":
        lines += ["## Feature visualisation", "", "Not drawn for packed runs: each member keeps its own share of "
                  "the parent's hidden units, so the models share no penultimate unit to compare.", ""]
    elif features and ensemble is not None:
        lines += ["## Feature visualisation", "", *_feature_grid(ensemble, data.train.x, config["seed"],
                                                              run_dir / "features.png", progress), ""]
    report = run_dir / "report.md"
    text = "\n".join(lines)
    atomic_write(report, lambda handle: handle.write(text.encode()))
    progress(f"[report] wrote {report}")
    return report


def _packed_section(packed: dict) -> list[str]:
    """Sizes of the packed network against the parent's, and every partition tried (validation decided;
    test measured after the choice)."""
    parent, net = packed["parent"], packed["packed"]
    lines = [f"{packed['members']} members, every hidden unit in {packed['overlap']} of them, in one network of "
             f"{net['parameters']:,} parameters ({net['parameters'] / parent['parameters']:.2f}x the parent's "
             f"{parent['parameters']:,}) and {net['flops'] / parent['flops']:.2f}x its FLOPs per sample.", "",
             "| partition | val accuracy | val nll | test accuracy | test nll | chosen |",
             "| ---: | ---: | ---: | ---: | ---: | :---: |"]
    for c in packed["candidates"]:
        test = (f"{c['test_accuracy']:.4f} | {c['test_nll']:.4f}" if "test_accuracy" in c else "- | -")
        lines.append(f"| {c['candidate']} | {c['val_accuracy']:.4f} | {c['val_nll']:.4f} | {test} | "
                     f"{'yes' if c['candidate'] == packed['chosen'] else ''} |")
    return lines


def _diversity_section(metrics: dict, run_dir: Path) -> list[str]:
    """Mean pairwise diversity and its heatmaps; with one member there are no pairs, which is said."""
    if len(metrics.get("members", [])) == 1:
        return ["## Member diversity", "", "n/a (one member): diversity is measured between pairs of members.", ""]
    if not metrics.get("diversity"):
        return []
    _diversity_plot(metrics["diversity"], run_dir / "diversity.png")
    lines = ["## Member diversity", "", "| measure | mean over member pairs |", "| --- | ---: |"]
    lines += [f"| {title} | {metrics['diversity'][key]['mean']:.4f} |" for key, title in DIVERSITY_PANELS
              if key in metrics["diversity"]]
    return lines + ["", "![pairwise member diversity](diversity.png)", ""]


def _describe_config(config: dict, metrics: dict, family: Family | None,
                     population: pd.DataFrame | None = None) -> str:
    """The run in one paragraph; the search's size is what ran (population log, metrics), not only the plan."""
    data, model = config["data"], config["model"]
    method = metrics.get("method") or config.get("method") or "subnetworks"
    parts = [f"Dataset **{data['name']}**, model **{model.get('architecture') or model['name']}**, seed {config['seed']}"]
    if family is not None:
        search = config["search"]
        extent = search_extent(population, search["generations"], metrics.get("search"), search.get("patience"))
        members = len(metrics.get("members", []))
        # Tuned scoring chooses its ensemble greedily from the pool; ensemble.selection is not used.
        rule = ("greedy from the parent and every tuned candidate" if search.get("scoring") == "tuned"
                else f"{config['ensemble']['selection']} selection")
        parts.append(f"**{family.name}** children ({family.summary()}); {extent}, fitness val {search['fitness']}; "
                     f"ensemble of {members} ({rule})"
                     + ("; one member, so no diversity to measure" if members == 1 else ""))
    else:
        parts.append(f"method **{method}**, {len(metrics.get('members', []))} member(s)")
    samples = metrics.get("test_samples")
    return ". ".join(parts) + f". {'?' if samples is None else f'{samples:,}'} test samples."


def _metrics_row(name: str, m: dict) -> str:
    return f"| {name} | {m['accuracy']:.4f} | {m['nll']:.4f} | {m['ece']:.4f} | {m.get('brier', math.nan):.4f} |"


def _metrics_table(metrics: dict) -> list[str]:
    rows = ["| model | accuracy | NLL | ECE | Brier |", "| --- | ---: | ---: | ---: | ---: |"]
    if metrics.get("parent"):
        rows.append(_metrics_row("parent", metrics["parent"]))
    members = metrics.get("members", [])
    if members:
        rows.append(_metrics_row("first member", members[0]))
        rows.append(_metrics_row("members (mean)", {k: statistics.fmean(m[k] for m in members)
                                                    for k in ("accuracy", "nll", "ece", "brier")}))
    rows.append(_metrics_row(f"ensemble ({len(members)})", metrics["ensemble"]))
    return rows


def _gain_section(metrics: dict) -> list[str]:
    """The verdict, temperature-scaled metrics, and the NLL gain split into member cost and diversity."""
    lines = []
    for split, title in (("test", "test split"), ("holdout", "held-back validation")):
        verdict = (metrics.get("verdict") or {}).get(split)
        if verdict:
            lines.append(_verdict_line(verdict, title, _split_rows(metrics, split)))
    if any("outcome" in v for v in (metrics.get("verdict") or {}).values() if v):
        lines += ["", "The +- figures are paired standard errors: the parent and the ensemble are compared row by "
                  "row on the same rows; a difference counts only beyond 2 of them."]
    scaled = metrics.get("temperature")
    if scaled:
        lines += ["", "Temperature scaling (fitted on the validation split) separates calibration from ensembling:",
                  "", "| model | temperature | test NLL | test NLL (scaled) | test ECE | test ECE (scaled) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for name in ("parent", "ensemble"):
            raw, ts = metrics[name], scaled[name]
            lines.append(f"| {name} | {ts['temperature']:.3f} | {raw['nll']:.4f} | {ts['test']['nll']:.4f} | "
                         f"{raw['ece']:.4f} | {ts['test']['ece']:.4f} |")
    lines += ["", "Where the NLL gain comes from (gain = diversity - member cost; member cost = mean member NLL - "
              "parent NLL, diversity = mean member NLL - ensemble NLL):", "",
              "| split | parent | mean member | ensemble | member cost | diversity | gain |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for split in ("test", "holdout"):
        gain = metrics["gain"].get(split)
        if gain:
            g = gain["nll"]
            lines.append(f"| {split} | {g['parent']:.4f} | {g['mean_member']:.4f} | {g['ensemble']:.4f} | "
                         f"{g['member_cost']:+.4f} | {g['diversity']:+.4f} | {g['gain']:+.4f} |")
    return lines


def _split_rows(metrics: dict, split: str) -> int | None:
    """Rows of the test split or of the held-back part of validation, as recorded."""
    if split == "test":
        return metrics.get("test_samples")
    return (metrics.get("holdout") or {}).get("samples")


def _selection_rows(metrics: dict) -> str:
    """The rows candidates are scored on: the selection part of the validation split (all of it when nothing
    is held back)."""
    selection = (metrics.get("validation") or {}).get("samples")
    held = (metrics.get("holdout") or {}).get("samples")
    if selection is None:
        return "validation split"
    if held:
        return f"selection split ({selection:,} of {selection + held:,} validation rows)"
    return f"validation split ({selection:,} rows)"


def _verdict_line(verdict: dict, title: str, rows: int | None) -> str:
    """One bullet: the ensemble against its parent on one split, said as a difference only when it is beyond
    noise (2 paired standard errors)."""
    where = f"the {title}" + (f" ({rows:,} rows)" if rows else "")
    if "outcome" not in verdict:  # written before per-row differences were recorded
        word = "beats" if verdict["beats_parent"] else "does **not** beat"
        return (f"- On {where} the ensemble {word} its parent: accuracy {verdict['accuracy_points']:+.2f} points, "
                f"NLL {100 * verdict['nll_change']:+.1f}% (no standard error recorded: read small splits with care).")
    words = OUTCOME_WORDS[verdict["outcome"]]
    if verdict["outcome"] in ("better", "worse"):
        words = f"**{words}** than its parent"
    return (f"- On {where}: {words}; accuracy {verdict['accuracy_points']:+.2f} +- "
            f"{verdict['accuracy_se_points']:.2f} points, NLL {percent(verdict['nll_change'], sign=True)} +- "
            f"{percent(verdict['nll_change_se'])}.")


def _ensemble_by_generation(metrics: dict) -> list[str]:
    """Tuned scoring: the ensemble chosen after each generation, on the selection split and held back."""
    checks = [c for c in (metrics.get("search") or {}).get("generations", []) if "ensemble_nll" in c]
    if not checks:
        return []
    rows = ["The ensemble chosen from the parent and every tuned candidate after each generation (selection-split "
            "NLL: what the choice minimises; held-back NLL: data no decision saw; sigma: the centre of the "
            "generation's perturbation strengths, as a multiple of children.sigma).", "",
            "| generation | members | parent in it | new members | sigma x | selection NLL | held-back NLL |",
            "| ---: | ---: | :---: | ---: | ---: | ---: | ---: |"]
    for c in checks:
        held = c.get("holdout_ensemble_nll")
        rows.append(f"| {c['generation']} | {c['ensemble_size']} | {'yes' if c['parent_in_ensemble'] else 'no'} | "
                    f"{c['joined']} | {c['step_scale']:.2f} | {c['ensemble_nll']:.4f} | "
                    f"{'-' if held is None else f'{held:.4f}'} |")
    return rows + [""]


def _selection_table(metrics: dict, config: dict) -> list[str]:
    used = config["ensemble"]["selection"]
    rows = [f"Both rules choose on the {_selection_rows(metrics)}; test metrics are measured afterwards"
            + (" (before member fine-tuning)" if config.get("finetune", {}).get("epochs") else "") + ".", "",
            "| rule | distinct members | val accuracy | val NLL | test accuracy | test NLL | test ECE |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for rule, result in metrics["selection"].items():
        val, test = result["validation"], result["test"]
        name = f"{rule} (used)" if rule == used else rule
        rows.append(f"| {name} | {len(set(result['candidates']))} | {val['accuracy']:.4f} | {val['nll']:.4f} | "
                    f"{test['accuracy']:.4f} | {test['nll']:.4f} | {test['ece']:.4f} |")
    return rows


def _parent_validation(parent: torch.nn.Module, validation: Split, fitness: str) -> float:
    return classification_metrics(predict_probs(parent, validation.x), validation.y)[fitness]


# ------------------------------------------------------------------------------------------------ plots

def _growth_plot(metrics: dict, path: Path) -> None:
    growth = metrics["growth"]
    sizes = [g["members"] for g in growth]
    figure = Figure(figsize=(9.0, 3.6))
    for axes, key, title in zip(figure.subplots(1, 2), ("accuracy", "nll"), ("accuracy", "NLL")):
        axes.plot(sizes, [g[key] for g in growth], "o-", label="ensemble")
        if metrics.get("parent"):
            axes.axhline(metrics["parent"][key], color="black", linestyle="--", linewidth=1, label="parent")
        axes.set_title(f"Test {title} vs ensemble size")
        axes.set_xlabel("members")
        axes.set_ylabel(f"test {title}")
        axes.legend()
    _save(figure, path)


def _diversity_plot(diversity: dict, path: Path) -> None:
    panels = [(key, title) for key, title in DIVERSITY_PANELS if key in diversity]
    figure = Figure(figsize=(4.0 * len(panels), 3.6))
    for axes, (key, title) in zip(np.atleast_1d(figure.subplots(1, len(panels))), panels):
        matrix = np.array(diversity[key]["matrix"])
        image = axes.imshow(matrix, cmap="viridis")
        figure.colorbar(image, ax=axes, fraction=0.046)
        axes.set_title(f"{title}\nmean {diversity[key]['mean']:.3f}")
        axes.set_xlabel("member")
        axes.set_ylabel("member")
        ticks = range(len(matrix))
        axes.set_xticks(list(ticks))
        axes.set_yticks(list(ticks))
    _save(figure, path)


def _reliability_plot(reliability: dict, path: Path) -> None:
    figure = Figure(figsize=(5.0, 4.6))
    axes = figure.subplots()
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    for name, bins in reliability.items():
        used = [b for b in bins if b["count"] > 0]
        axes.plot([b["confidence"] for b in used], [b["accuracy"] for b in used], "o-", label=name)
    axes.set_title("Reliability diagram (test split)")
    axes.set_xlabel("confidence (mean per bin)")
    axes.set_ylabel("accuracy per bin")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.legend()
    _save(figure, path)


FEATURE_POOL_BYTES = 64 * 2**20


def _feature_grid(ensemble: Ensemble, train_x: torch.Tensor, seed: int, path: Path,
                  progress: Progress) -> list[str]:
    rows = ([("parent", ensemble.parent)] if ensemble.parent is not None else []) + \
        [(f"member {i}", m) for i, m in enumerate(ensemble.members[:FEATURE_MEMBERS])]
    units = pick_units(rows[0][1], ensemble.input_shape, FEATURE_UNITS, seed)
    # Up to 2,000 training inputs, fewer where they are large (about 64 MiB of them: 341 images of 128x128 RGB).
    pool = train_x[:max(1, min(2000, FEATURE_POOL_BYTES // (4 * math.prod(train_x.shape[1:]))))].float()
    start = starting_inputs(rows[0][1], units, pool, pool=len(pool))
    bounds = tuple(np.quantile(pool.numpy(), [0.005, 0.995]).tolist())
    images = []
    table = ["| model | " + " | ".join(f"unit {u}" for u in units) + " |", "| --- |" + " ---: |" * len(units)]
    progress(f"[report] feature visualisation: {len(units)} units in {len(rows)} models")
    with Steps(progress, len(rows), "[report] features", "models") as steps:
        for name, model in rows:
            with torch_threads(1):  # a handful of inputs per step: intra-op threads only add overhead
                inputs = maximise_units(model, units, start, bounds, seed=seed)
            images.append(inputs)
            activation = unit_activations(model, units, inputs)
            table.append(f"| {name} | " + " | ".join(f"{a:.2f}" for a in activation.tolist()) + " |")
            steps.step(f"[report] features of {name} done")
    _grid_plot(images, [name for name, _ in rows], units, path)
    return [(f"The input that maximises each of {len(units)} randomly chosen penultimate units (seed {seed}), "
            "found by gradient ascent in every model from the same start (the training sample that excites "
            "the unit most in the first model), with L2, total-variation and jitter regularisers. Similar rows mean members kept the parent's features; a flat panel is a unit "
            "that no input excites (for example a pruned one)."), "",
            "![feature visualisation grid](features.png)", "",
            "Activation each visualisation reaches:", "", *table]


def _grid_plot(images: list[torch.Tensor], names: list[str], units: list[int], path: Path) -> None:
    rows, cols = len(images), len(units)
    figure = Figure(figsize=(1.9 * cols + 1.0, 1.5 * rows + 0.6))
    grid = np.array(figure.subplots(rows, cols, squeeze=False))
    signal = images[0].dim() - 1 < 3  # (C, L) or (L,) inputs are signals, (C, H, W) images
    for r, (batch, name) in enumerate(zip(images, names)):
        for c, unit in enumerate(units):
            axes = grid[r, c]
            x = batch[c].float()
            if signal:
                for channel in x.reshape(-1, x.shape[-1]):
                    axes.plot(channel.numpy(), linewidth=1)
                axes.set_yticks([])
            else:
                picture = x.mean(dim=0) if x.shape[0] != 3 else x.permute(1, 2, 0)
                picture = (picture - picture.min()) / (picture.max() - picture.min()).clamp_min(1e-12)
                axes.imshow(picture.numpy(), cmap="gray")
                axes.set_yticks([])
            axes.set_xticks([])
            if r == 0:
                axes.set_title(f"unit {unit}", fontsize=9)
            if c == 0:
                axes.set_ylabel(name, fontsize=9)
    figure.suptitle("Feature visualisation: same units, parent and members")
    _save(figure, path)


# ------------------------------------------------------------------------------------------ a folder

def _run_group(name: str) -> str:
    """The run name without its seed and time stamp: runs of one config over several seeds share it."""
    return re.sub(r"-s\d+(-\d{8}-\d{6})?$", "", name)


def _mean_se(values: list[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.4f}"
    return f"{mean:.4f} +- {statistics.stdev(values) / math.sqrt(len(values)):.4f}"


def _count(values) -> str:
    """A cost cell: the count when every run spent the same, else the mean."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    return f"{values[0]:,g}" if len(set(values)) == 1 else f"{statistics.fmean(values):,.0f} (mean)"


def _folder_report(folder: Path, runs: list[Path], progress: Progress) -> Path:
    groups: dict[str, list[dict]] = {}
    for run_dir in runs:
        metrics = read_metrics(run_dir)
        groups.setdefault(_run_group(run_dir.name), []).append(dict(metrics, _run=run_dir.name))
    lines = [f"# Runs in {folder.name}", "", ("Test split; mean +- standard error over the runs of each group "
             "(runs whose names differ only in seed and time stamp)."), "",
             "| group | runs | accuracy | NLL | ECE | disagreement | train epochs | train sample-passes | "
             "eval forward passes |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for group, items in groups.items():
        cost = [m.get("cost", {}) for m in items]
        cells = [_mean_se([m["ensemble"][k] for m in items]) for k in ("accuracy", "nll", "ece")]
        cells.append(_mean_se([m["diversity"]["disagreement"]["mean"] if len(m.get("members", [])) > 1
                               else math.nan for m in items]))
        cells += [_count(c.get(k, math.nan) for c in cost)
                  for k in ("train_epochs", "train_sample_passes", "eval_forward_passes")]
        lines.append(f"| {group} | {len(items)} | " + " | ".join(cells) + " |")
    parents = [(m["_run"], m["parent"]) for items in groups.values() for m in items if m.get("parent")]
    if parents:
        lines += ["", "Parents of the subnetwork runs:", "", "| run | accuracy | NLL | ECE |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {name} | {p['accuracy']:.4f} | {p['nll']:.4f} | {p['ece']:.4f} |" for name, p in parents]
    lines += ["", "Per-run reports: " + ", ".join(f"[{r.name}]({r.name}/report.md)" for r in runs), ""]
    report = folder / "report.md"
    text = "\n".join(lines)
    atomic_write(report, lambda handle: handle.write(text.encode()))
    progress(f"[report] wrote {report}")
    return report
