"""Ensemble policies against their parent on unseen episodes: MinAtar (the CPU benchmark) and ProcGen.

For each game and seed one PPO parent is trained (the first arm's run) and shared by every arm through
``model.parent_path``; each arm derives children, selects an ensemble on the validation episodes and tests
parent and ensemble on the same unseen test episodes. Prints, per game and arm, mean +- standard error
over seeds of the test return and its IQM for the parent and the ensemble, and of the ensemble's gain.
Finished runs in the output folder are read back, so an interrupted benchmark goes on where it stopped.

    evo-subens bench rl --games breakout,space_invaders --seeds 0,1,2 --steps 200000
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

from ..core.runner import run

# Each arm: the children and the ensemble rule. "pseudo" is the ProcGen work's pseudo-ensemble: copies of
# the parent with noise on the final layer only, consulted when the parent's normalised entropy exceeds
# 0.975, by majority vote; "pseudo@T" is the same with gate threshold T (0.975 suits ProcGen's 15 actions: a
# confident policy over MinAtar's 3-6 actions rarely comes that close to uniform, and the gate never opens).
ARMS: dict[str, dict] = {
    "noisy": {"children": {"family": "noisy", "density": 0.1, "sigma": 0.5, "sigma_mode": "relative"},
              "ensemble": {"rule": "mean"}},
    "pseudo": {"children": {"family": "noisy", "density": 1.0, "sigma": 0.1, "sigma_mode": "absolute",
                            "layers": ["classifier.*"], "include_classifier": True},
               "ensemble": {"rule": "gated", "gate_threshold": 0.975}},
}


def _env(game: str) -> str:
    return game if ":" in game else f"minatar:{game}"


def _slug(game: str) -> str:
    return game.replace(":", "-")


def _config(game: str, seed: int, steps: int, arm: str, output_dir: Path, executor: str,
            parent: Path | None) -> dict:
    env = {"id": _env(game), "num_envs": 8, "validation_episodes": 16, "test_episodes": 50,
           "max_episode_steps": 2000}
    ppo = {"total_steps": steps, "num_steps": 128, "lr": 5e-4}
    policy = "minatar_cnn"
    if env["id"].startswith("procgen:"):
        # The ProcGen protocol (200 training levels, unseen test levels) with the CPU's policy: the small
        # Nature CNN (the IMPALA CNN trains at ~40 env steps/s on 2 cores; see configs/procgen.yaml).
        env.update(num_envs=16, train_seed=0, train_levels=200, validation_seed=200_000, test_seed=300_000,
                   max_episode_steps=None, actions="sampled")
        ppo.update(num_steps=256, gamma=0.999, update_epochs=3, num_minibatches=8)
        policy = "nature_cnn"
    config = {
        "task": "rl", "seed": seed, "name": f"{_slug(game)}-{arm}-s{seed}", "output_dir": str(output_dir),
        "env": env, "ppo": ppo, "policy": {"name": policy},
        "search": {"population": 12, "generations": 2, "elites": 4, "fitness": "return"},
        "workers": {"executor": executor},
        "finetune": {"epochs": 0},
        "ensemble": {"size": 4, "holdout": 0.25, "acceptance": False},
        "model": {"parent_path": str(parent) if parent else None},
    }
    base, _, threshold = arm.partition("@")
    for key, value in ARMS[base].items():
        config[key] = {**config.get(key, {}), **value}
    if threshold:
        config["ensemble"]["gate_threshold"] = float(threshold)
    return config


def _mean_se(values: list[float]) -> str:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return f"{mean:.2f} +- {se:.2f}"


def _gate_open(runs: list[dict]) -> str:
    """The mean share of test steps where a gated ensemble's members voted ('-' for other rules)."""
    shares = [m["ensemble"]["test"].get("gate_open") for m in runs]
    return "-" if None in shares else f"{statistics.fmean(shares):.2%}"


def _metrics(config: dict) -> dict:
    run_dir = Path(config["output_dir"]) / config["name"]
    if (run_dir / "metrics.json").is_file():
        return json.loads((run_dir / "metrics.json").read_text())
    return run(config).metrics


def rl_bench(*, games: list[str], seeds: list[int], steps: int, arms: list[str], output_dir: str = "runs/bench-rl",
             executor: str = "ray") -> dict:
    """Run (or read back) every game x arm x seed and print the comparison; returns the collected numbers."""
    unknown = [a for a in arms if a.partition("@")[0] not in ARMS]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; known: {', '.join(ARMS)} (pseudo@T: gate threshold T)")
    root = Path(output_dir)
    started = time.perf_counter()
    results: dict = {}
    for game in games:
        for seed in seeds:
            parent = None
            for arm in arms:
                metrics = _metrics(_config(game, seed, steps, arm, root, executor, parent))
                parent = parent or root / f"{_slug(game)}-{arms[0]}-s{seed}" / "parent.pt"
                results.setdefault((game, arm), []).append(metrics)
    print(f"\nPPO parent: {steps:,} env steps per seed; test: 50 unseen episodes per policy; "
          f"{time.perf_counter() - started:.0f}s")
    print(f"{'game':<22}{'arm':<12}{'parent return':>18}{'ensemble return':>18}{'gain':>16}"
          f"{'parent IQM':>18}{'ensemble IQM':>18}{'gate open':>11}")
    for (game, arm), runs in results.items():
        parent = [m["parent"]["test"]["mean"] for m in runs]
        ensemble = [m["ensemble"]["test"]["mean"] for m in runs]
        print(f"{game:<22}{arm:<12}{_mean_se(parent):>18}{_mean_se(ensemble):>18}"
              f"{_mean_se([e - p for e, p in zip(ensemble, parent)]):>16}"
              f"{_mean_se([m['parent']['test']['iqm'] for m in runs]):>18}"
              f"{_mean_se([m['ensemble']['test']['iqm'] for m in runs]):>18}{_gate_open(runs):>11}")
    return results
