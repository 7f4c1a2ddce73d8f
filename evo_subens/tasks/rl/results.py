"""Final metrics of an RL run: returns of the parent, each member and the ensemble policies on unseen test
episodes and on training episodes, with the generalisation gap between them."""

from __future__ import annotations

import itertools

from torch import nn

from .envs import episode_returns, training_seeds
from .ensemble import RULES, EnsemblePolicy
from .stats import summarise


def _returns(policy: nn.Module, env, seeds: list[int]) -> dict:
    return summarise(episode_returns(policy, env, seeds).returns)


def policy_results(parent: nn.Module, members: list[nn.Module], member_ids: list[int], cfg) -> dict:
    """Return statistics on the test seeds and on as many training seeds, for the parent, each member and
    the ensemble under every rule; ``ensemble`` is the configured rule's."""
    env = cfg.env
    splits = {"test": env.test_seeds, "train": list(itertools.islice(training_seeds(env), env.test_episodes))}

    def measure(policy: nn.Module) -> dict:
        return {name: _returns(policy, env, seeds) for name, seeds in splits.items()}

    def measure_ensemble(rule: str) -> dict:
        results = {}
        for name, seeds in splits.items():
            policy = EnsemblePolicy(members, rule, parent, cfg.ensemble.gate_threshold)
            results[name] = _returns(policy, env, seeds)
            if rule == "gated":  # the share of steps where the parent was unsure and the members voted
                results[name]["gate_open"] = policy.consulted / max(policy.decisions, 1)
        return results

    metrics = {"parent": measure(parent),
               "members": [dict(candidate=c, **measure(m)) for c, m in zip(member_ids, members)],
               "ensembles": {rule: measure_ensemble(rule) for rule in RULES}}
    metrics["ensemble"] = dict(metrics["ensembles"][cfg.ensemble.rule], rule=cfg.ensemble.rule)
    metrics["generalisation_gap"] = {
        name: m["train"]["mean"] - m["test"]["mean"]
        for name, m in [("parent", metrics["parent"]), ("ensemble", metrics["ensemble"])]}
    return metrics


def verdict(metrics: dict) -> dict:
    """The ensemble policy against its parent: mean return gains on test and training episodes."""
    ensemble, parent = metrics["ensemble"], metrics["parent"]
    return {"test_return_gain": ensemble["test"]["mean"] - parent["test"]["mean"],
            "test_iqm_gain": ensemble["test"]["iqm"] - parent["test"]["iqm"],
            "train_return_gain": ensemble["train"]["mean"] - parent["train"]["mean"],
            "beats_parent_on_test": ensemble["test"]["mean"] > parent["test"]["mean"]}


def summary_lines(metrics: dict, offered: int) -> list[str]:
    """The test/train return table, then the verdict line."""
    def row(name: str, m: dict) -> str:
        t, r = m["test"], m["train"]
        low, high = t["ci95"]["mean"]
        return (f"{name:<22}{t['mean']:>10.2f}  [{low:.2f}, {high:.2f}]{t['median']:>9.2f}{t['iqm']:>9.2f}"
                f"{r['mean']:>10.2f}")

    lines = [f"{'return':<22}{'test mean':>10}  {'95% CI':<16}{'median':>7}{'IQM':>9}{'train mean':>12}",
             row("parent", metrics["parent"])]
    if metrics["members"]:
        best = max(metrics["members"], key=lambda m: m["test"]["mean"])
        lines.append(row("best member", best))
    members = len(metrics["members"])
    for rule, m in metrics["ensembles"].items():
        mark = " *" if rule == metrics["ensemble"]["rule"] else ""
        lines.append(row(f"ensemble {rule} ({members}/{offered}){mark}", m))
    if "gate_open" in metrics["ensembles"].get("gated", {}).get("test", {}):
        lines.append(f"gated: the members voted on {metrics['ensembles']['gated']['test']['gate_open']:.1%} of "
                     f"test steps (the parent's normalised entropy above the gate threshold)")
    v = metrics["verdict"]
    lines.append(f"verdict: ensemble ({metrics['ensemble']['rule']}) vs parent on unseen test episodes: mean return "
                 f"{v['test_return_gain']:+.2f}, IQM {v['test_iqm_gain']:+.2f}; generalisation gap (train - test) "
                 f"parent {metrics['generalisation_gap']['parent']:.2f}, ensemble "
                 f"{metrics['generalisation_gap']['ensemble']:.2f}")
    return ["\n".join(lines)]
