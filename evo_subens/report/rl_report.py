"""The report of a reinforcement-learning run: returns of the parent, the best member and every ensemble
rule on unseen test episodes and on training episodes, the generalisation gap, and the validation return
of each generation."""

from __future__ import annotations

from pathlib import Path

from ..core.logs import load_population
from ..core.rundir import atomic_write
from .fitness import fitness_plot, search_extent


def _row(name: str, m: dict) -> str:
    test, train = m["test"], m["train"]
    low, high = test["ci95"]["mean"]
    return (f"| {name} | {test['mean']:.2f} | [{low:.2f}, {high:.2f}] | {test['median']:.2f} | {test['iqm']:.2f} | "
            f"{train['mean']:.2f} | {train['mean'] - test['mean']:.2f} |")


def rl_report(run_dir: Path, config: dict, metrics: dict) -> Path:
    """Write ``run_dir/report.md`` (and ``fitness.png``) for an RL run; returns the report's path."""
    env, search = config["env"], config["search"]
    population = load_population(run_dir) if (run_dir / "population.parquet").is_file() else None
    extent = search_extent(population, search["generations"], metrics.get("search"), search.get("patience"))
    lines = [f"# {run_dir.name}", "",
             f"Environment **{env['id']}**, policy **{config['policy']['name']}**, seed {config['seed']}. "
             f"**{config['children']['family']}** children; {extent} scored by the mean return of "
             f"{env['validation_episodes']} "
             f"seeded validation episodes; ensemble of {len(metrics['members'])} acting by the "
             f"**{metrics['ensemble']['rule']}** rule.", "",
             "## Returns", "",
             f"Test: {env['test_episodes']} episodes on seeds no decision saw; train: as many training episodes. "
             "95% intervals are percentile bootstraps of the mean.", "",
             "| policy | test mean | 95% CI | median | IQM | train mean | train - test |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |", _row("parent", metrics["parent"])]
    for member in metrics["members"]:
        lines.append(_row(f"member {member['candidate']}", member))
    for rule, m in metrics["ensembles"].items():
        lines.append(_row(f"ensemble, {rule}" + (" (chosen)" if rule == metrics["ensemble"]["rule"] else ""), m))
    verdict = metrics["verdict"]
    lines += ["", f"Ensemble vs parent on test episodes: mean return {verdict['test_return_gain']:+.2f}, IQM "
                  f"{verdict['test_iqm_gain']:+.2f}.", ""]
    opened = metrics["ensembles"].get("gated", {}).get("test", {}).get("gate_open")
    if opened is not None:
        lines += [f"Gated rule: the parent's normalised entropy exceeded {config['ensemble']['gate_threshold']} "
                  f"(the members voted) on {opened:.1%} of test steps.", ""]
    if metrics.get("cost"):
        lines += ["Cost: " + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in metrics["cost"].items()), ""]
    if population is not None:
        notes = fitness_plot(population, search["fitness"], None, run_dir / "fitness.png", task="rl",
                             planned=search["generations"],
                             stopped_early=bool((metrics.get("search") or {}).get("stopped_early")),
                             rows="validation episodes")
        lines += ["## Search", "", "Validation return of each generation's candidates; the dashed line is the "
                  "parent scored the same way on the same episodes.", *notes, "",
                  "![return per generation](fitness.png)", ""]
    report = run_dir / "report.md"
    text = "\n".join(lines)
    atomic_write(report, lambda handle: handle.write(text.encode()))
    return report
