"""How much sparsity a model affords: random-mask children of one trained parent, tuned, against the parent.

For a config (its data, model and parent training), trains the parent once, then for each sparsity tunes
``members`` children with random connection masks (global scope, the classifier never pruned) for
``tune_epochs`` one-cycle epochs with the mask fixed, and prints the parent's test accuracy and NLL, the
children's mean and their ensemble's. The sparsity a model *affords* is the largest whose tuned children
are on average within half a point of the parent's accuracy (:data:`TOLERANCE`). Each arm is an ordinary run of the engine (sparse
family, no further fine-tuning, every child ensembled), written under ``output_dir``.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

from ..core.config import TuneConfig, config_to_dict, load_config
from ..core.runner import run

TOLERANCE = 0.005  # accuracy a tuned child may lose against its parent at a sparsity the model affords


def sparsity_table(config: str, *, sparsities: list[float], members: int = 4, tune_epochs: int = 2,
                   tune_lr: float = 0.05, seed: int = 0, output_dir: str = "runs/bench-sparsity",
                   executor: str = "local", overrides: list[str] | None = None) -> list[dict]:
    """Run every sparsity of ``sparsities`` on the parent of ``config`` and print the table; returns its rows."""
    started = time.perf_counter()
    base = config_to_dict(load_config(config, overrides or []))
    parent_path = base["model"]["parent_path"]
    rows = []
    for sparsity in sparsities:
        cfg = copy.deepcopy(base)
        cfg.update(name=f"{Path(config).stem}-{sparsity:g}-s{seed}-{time.strftime('%Y%m%d-%H%M%S')}", seed=seed,
                   output_dir=output_dir)
        cfg["model"]["parent_path"] = parent_path
        # The sparse family's section: the config's own if it is one, else its defaults (and the config's layers).
        tune = dict(base["children"].get("tune") or config_to_dict(TuneConfig()),
                    epochs=tune_epochs, lr=tune_lr, lr_schedule="onecycle")
        cfg["children"] = {"family": "sparse", "layers": base["children"].get("layers", ["*"]), "mask": "random",
                           "sparsity": sparsity, "structure": "connection", "scope": "global", "tune": tune}
        cfg["search"].update(population=members, generations=1, elites=1, patience=0)
        cfg["finetune"]["epochs"] = 0
        cfg["ensemble"].update(size=members, acceptance=False, holdout=0.0, selection="topk")
        cfg["workers"]["executor"] = executor
        result = run(cfg, progress=lambda line: None)
        parent_path = str(result.run_dir / "parent.pt")  # every sparsity tunes children of the same parent
        metrics = result.metrics
        row = {"sparsity": sparsity, "parent_accuracy": metrics["parent"]["accuracy"],
               "parent_nll": metrics["parent"]["nll"],
               "child_accuracy": statistics.fmean(m["accuracy"] for m in metrics["members"]),
               "child_nll": statistics.fmean(m["nll"] for m in metrics["members"]),
               "ensemble_accuracy": metrics["ensemble"]["accuracy"], "ensemble_nll": metrics["ensemble"]["nll"]}
        rows.append(row)
        print(f"[sparsity] {sparsity:.0%}: children {row['child_accuracy']:.4f} / {row['child_nll']:.4f}  "
              f"ensemble {row['ensemble_accuracy']:.4f} / {row['ensemble_nll']:.4f}", flush=True)
    parent = rows[0]
    print(f"\n{config}: parent test accuracy {parent['parent_accuracy']:.4f}, NLL {parent['parent_nll']:.4f}; "
          f"{members} random children per sparsity, tuned {tune_epochs} epoch(s); "
          f"{time.perf_counter() - started:.0f}s")
    print(f"{'sparsity':>9}{'child acc':>11}{'child nll':>11}{'ens acc':>10}{'ens nll':>10}")
    for row in rows:
        print(f"{row['sparsity']:>9.0%}{row['child_accuracy']:>11.4f}{row['child_nll']:>11.4f}"
              f"{row['ensemble_accuracy']:>10.4f}{row['ensemble_nll']:>10.4f}")
    afforded = [r["sparsity"] for r in rows if r["child_accuracy"] >= r["parent_accuracy"] - TOLERANCE]
    print(f"affords: {max(afforded):.0%}" if afforded else "affords: none of these sparsities")
    return rows
