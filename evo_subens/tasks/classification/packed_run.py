"""``method: packed``: a packed partition ensemble cut from the parent, tuned packed, chosen on validation.

Top to bottom: the parent (trained, or loaded from ``model.parent_path``) is stored as ``parent.pt``; then
``packed.candidates`` partitions of its hidden units are cut (:func:`evo_subens.packed.cut_parent`), each
tuned with all its members at once (one optimiser; every member's loss is its own cross-entropy, so one
pass trains each member as if alone) and scored on the selection split; the one whose ensemble has the
lowest validation NLL is the run's ensemble (``members/packed.pt``). Candidate ``i``'s partition and
tuning are seeded by the run seed and ``i`` alone, and every tuned candidate is stored before the
checkpoint ``packed.json`` names it, so a killed run resumed goes on from the next candidate and ends
with the same files as one never stopped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ...core.faults import crash_point
from ...core.progress import Steps, run_seconds
from ...core.rundir import write_json, write_state
from ...core.state import RunResult
from ...core.worker import numerics, parent_fingerprint
from ...errors import RunDirError, UserError
from ...nn import count_parameters, load_state_file, state_copy
from ...packed import PackedEnsemble, count_flops, cut_parent
from .cost import cost_record
from .metrics import classification_metrics
from .results import ensemble_test_metrics, validation_metrics, verdict, with_parent
from .training import predict_probs, train

if TYPE_CHECKING:
    from torch import nn

    from ...core.config import RunConfig
    from .task import ClassificationTask

CHECKPOINT = "packed.json"
MEMBERS_FILE = "members/packed.pt"
SEED_BOUND = 2**31 - 1


def candidate_seeds(seed: int, candidate: int) -> tuple[int, int]:
    """The partition seed and the tuning seed of candidate ``candidate`` of a run with ``seed``."""
    rng = np.random.default_rng([seed, candidate, 0x9AC])
    partition, tuning = rng.integers(SEED_BOUND, size=2)
    return int(partition), int(tuning)


def packed_criterion(members: int):
    """The sum of the members' mean cross-entropies on (B, M, C) logits: each member's gradient is the one
    it would get trained alone."""
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.transpose(1, 2), labels[:, None].expand(-1, members)) * members

    return loss


def tune_packed(packed: PackedEnsemble, data, cfg, *, seed: int, augment: bool = False, on_epoch=None) -> None:
    """Tune every member of ``packed`` at once on the training split ``data`` (one optimiser)."""
    torch.manual_seed(seed)  # dropout masks
    train(packed, data, cfg, seed=seed, augment=augment, on_epoch=on_epoch,
          forward=lambda model, x, step: model.member_logits(x), criterion=packed_criterion(packed.members))


@torch.inference_mode()
def member_outputs(packed: PackedEnsemble, x, batch_size: int, *, features: bool = False
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each member's probabilities on ``x`` (and, with ``features``, its penultimate features)."""
    from .streaming import batch_slices, input_batches

    packed.eval()
    classifier = max(i for i, spec in enumerate(packed.layout) if spec["kind"] == "linear")
    captured: list[torch.Tensor] = []
    handle = (packed.body[classifier].register_forward_hook(lambda m, inputs, out: captured.append(inputs[0]))
              if features else None)
    try:
        logits = torch.cat([packed.member_logits(b) for b in input_batches(x, batch_slices(len(x), batch_size))])
    finally:
        if handle is not None:
            handle.remove()
    probs = list(logits.softmax(dim=-1).unbind(dim=1))
    if not features:
        return probs, []
    feats = torch.cat(captured)
    return probs, list(feats.reshape(len(feats), packed.members, -1).unbind(dim=1))


def _parent(cfg: RunConfig, task: ClassificationTask, parent: nn.Module, run_dir: Path, saved: dict | None) -> str:
    """Train or load the parent, store it as parent.pt; on resume, reload it and check it is the same."""
    path = run_dir / "parent.pt"
    if saved is not None:
        parent.load_state_dict(load_state_file(path))
        if parent_fingerprint(state_copy(parent)) != saved["parent_id"]:
            raise RunDirError(f"{path} is not the parent this run's checkpoint {run_dir / CHECKPOINT} was made with")
        parent.eval()
        return saved["parent_id"]
    if cfg.model.parent_path:
        task.progress(f"[parent] loaded {cfg.model.parent_path} ({count_parameters(parent):,} parameters)")
        task.check_loaded_parent(parent)
    else:
        task.train_parent(parent)
    parent.eval()
    try:
        task.check_parent_learned(parent)
    except UserError as exc:
        if cfg.parent.check_learned or cfg.model.parent_path:
            raise
        task.progress(f"[parent] warning: {exc}; going on, as parent.check_learned is false")
    state = state_copy(parent)
    write_state(path, state)
    return parent_fingerprint(state)


def read_checkpoint(run_dir: Path) -> dict | None:
    """The packed run's checkpoint, None where the run stopped before its parent was stored."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{path} is unreadable ({exc}); it is written atomically, so something else changed "
                          f"it") from None


def run_packed(cfg: RunConfig, run_dir: Path, task: ClassificationTask, parent: nn.Module) -> RunResult:
    """The packed method into ``run_dir`` (config.yaml and data.json written), from where its checkpoint
    says it stopped."""
    p, data, progress = cfg.packed, task.data, task.progress
    saved = read_checkpoint(run_dir)
    progress(f"[run] {run_dir}")
    progress(task.describe_data())
    state = {"parent_id": _parent(cfg, task, parent, run_dir, saved), "candidates": []}
    if saved is not None:
        state["candidates"] = saved["candidates"]
        progress(f"[resume] parent and {len(state['candidates'])} of {p.candidates} packed candidate(s) done")
    write_json(run_dir / CHECKPOINT, state)
    shape = data.input_shape
    batch = cfg.search.eval_batch_size
    example = cut_parent(parent, shape, p.members, overlap=p.overlap, seed=0)
    x1 = torch.zeros(1, *shape)
    sizes = {"parent": {"parameters": count_parameters(parent), "flops": count_flops(parent, x1)},
             "packed": {"parameters": count_parameters(example), "flops": count_flops(example, x1)}}
    progress(f"[packed] {p.members} members (every hidden unit in {p.overlap}), {p.candidates} partition(s), "
             f"each tuned {p.tune.epochs} epoch(s) packed: {sizes['packed']['parameters']:,} parameters "
             f"({sizes['packed']['parameters'] / sizes['parent']['parameters']:.2f}x the parent's), "
             f"{sizes['packed']['flops'] / sizes['parent']['flops']:.2f}x its FLOPs")
    (run_dir / "candidates").mkdir(exist_ok=True)
    with Steps(progress, p.candidates, "[packed]", "candidates") as steps:
        for i in range(len(state["candidates"]), p.candidates):
            partition, tuning = candidate_seeds(cfg.seed, i)
            packed = cut_parent(parent, shape, p.members, overlap=p.overlap, seed=partition)
            tune_packed(packed, data.train, p.tune, seed=tuning, augment=cfg.data.augment)
            probs, _ = member_outputs(packed, task.selection.x, batch)
            scores = classification_metrics(torch.stack(probs).mean(dim=0), task.selection.y)
            write_state(run_dir / "candidates" / f"{i}.pt", state_copy(packed))
            state["candidates"].append({"candidate": i, "partition_seed": partition, "tune_seed": tuning,
                                        "val_accuracy": scores["accuracy"], "val_nll": scores["nll"]})
            write_json(run_dir / CHECKPOINT, state)
            steps.step(f"[packed] candidate {i + 1}/{p.candidates}  val acc {scores['accuracy']:.4f}  "
                       f"val nll {scores['nll']:.4f}")
            crash_point("packed.after_candidate")
    best = min(state["candidates"], key=lambda c: (c["val_nll"], c["candidate"]))
    packed = stored_packed(cfg, parent, shape, best["candidate"], run_dir / "candidates" / f"{best['candidate']}.pt")
    (run_dir / "members").mkdir(exist_ok=True)
    write_state(run_dir / MEMBERS_FILE, state_copy(packed))
    write_json(run_dir / "members.json", [{"member": i, "candidate": best["candidate"], "packed": MEMBERS_FILE}
                                          for i in range(p.members)])
    metrics = _metrics(cfg, task, parent, packed, _tested(cfg, task, parent, run_dir, state), best, sizes)
    write_json(run_dir / "metrics.json", metrics)
    for line in summary(metrics):
        progress(line)
    progress(f"[run] results in {run_dir} ({run_seconds():.0f}s)")
    import pandas as pd

    return RunResult(run_dir, metrics, pd.DataFrame(state["candidates"]), [])


def _tested(cfg: RunConfig, task: ClassificationTask, parent: nn.Module, run_dir: Path, state: dict) -> list[dict]:
    """Every candidate's record with its test accuracy and NLL, measured after the choice (which saw only
    validation): whether choosing among partitions beats taking any one is then read off the run."""
    tested = []
    for record in state["candidates"]:
        i = record["candidate"]
        packed = stored_packed(cfg, parent, task.data.input_shape, i, run_dir / "candidates" / f"{i}.pt")
        probs, _ = member_outputs(packed, task.data.test.x, cfg.search.eval_batch_size)
        scores = classification_metrics(torch.stack(probs).mean(dim=0), task.data.test.y)
        tested.append(dict(record, test_accuracy=scores["accuracy"], test_nll=scores["nll"]))
    return tested


def _metrics(cfg: RunConfig, task: ClassificationTask, parent: nn.Module, packed: PackedEnsemble,
             candidates: list[dict], best: dict, sizes: dict) -> dict:
    data, batch = task.data, cfg.search.eval_batch_size
    test_y = data.test.y
    task.progress(f"[test] parent and the packed ensemble of {packed.members} members on {len(test_y):,} test "
                  f"samples")
    member_probs, member_features = member_outputs(packed, data.test.x, batch, features=True)
    parent_probs = predict_probs(parent, data.test.x, batch)
    ensemble = ensemble_test_metrics(member_probs, member_features, test_y,
                                     [{"member": i} for i in range(packed.members)])
    metrics = {"method": "packed", **with_parent(parent_probs, test_y, ensemble)}
    test_probs = {"parent": parent_probs, "ensemble": torch.stack(member_probs).mean(dim=0)}
    validation = data.validation
    metrics.update(validation_metrics(validation, len(task.selection), task.holdout is not None,
                                      predict_probs(parent, validation.x, batch),
                                      member_outputs(packed, validation.x, batch)[0], metrics, test_probs, test_y))
    p = cfg.packed
    tuned = p.tune.epochs * p.candidates
    parent_epochs = 0 if cfg.model.parent_path else cfg.parent.epochs
    metrics["packed"] = {"members": p.members, "overlap": p.overlap, "chosen": best["candidate"],
                         "candidates": candidates, **sizes}
    metrics["cost"] = cost_record(parent_epochs + tuned, (parent_epochs + tuned) * len(data.train),
                                  p.candidates * len(task.selection) + 2 * len(test_y))
    metrics["verdict"] = verdict(metrics)
    metrics["numerics"] = numerics()
    return metrics


def summary(metrics: dict) -> list[str]:
    """The lines a packed run ends with: parent and packed ensemble on test, and their sizes."""
    parent, ensemble, packed = metrics["parent"], metrics["ensemble"], metrics["packed"]
    scaled = metrics["temperature"]
    lines = [f"{'':24}{'accuracy':>9}{'nll':>9}{'ece':>9}{'nll (T)':>9}",
             f"{'parent':24}{parent['accuracy']:9.4f}{parent['nll']:9.4f}{parent['ece']:9.4f}"
             f"{scaled['parent']['test']['nll']:9.4f}",
             f"{'packed ensemble':24}{ensemble['accuracy']:9.4f}{ensemble['nll']:9.4f}{ensemble['ece']:9.4f}"
             f"{scaled['ensemble']['test']['nll']:9.4f}"]
    mean = {k: float(np.mean([m[k] for m in metrics["members"]])) for k in ("accuracy", "nll")}
    lines.append(f"{'member (mean)':24}{mean['accuracy']:9.4f}{mean['nll']:9.4f}")
    lines.append(f"[packed] {packed['members']} members in one network: {packed['packed']['parameters']:,} "
                 f"parameters ({packed['packed']['parameters'] / packed['parent']['parameters']:.2f}x the parent's), "
                 f"{packed['packed']['flops'] / packed['parent']['flops']:.2f}x its FLOPs; candidate "
                 f"{packed['chosen']} of {len(packed['candidates'])} chosen on validation NLL")
    return lines


def stored_packed(cfg: RunConfig, parent: nn.Module, input_shape, candidate: int, path: Path) -> PackedEnsemble:
    """Candidate ``candidate``'s tuned packed ensemble stored at ``path`` (eval mode), cut again with the
    candidate's own partition, so its layout names the parent units each member kept."""
    p = cfg.packed
    packed = cut_parent(parent, input_shape, p.members, overlap=p.overlap, seed=candidate_seeds(cfg.seed, candidate)[0])
    try:
        packed.load_state_dict(load_state_file(path))
    except Exception as exc:
        raise RunDirError(f"{path} is unreadable or does not fit the run's packed layout "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    return packed.eval()


def load_packed(run_dir: Path, cfg: RunConfig, parent: nn.Module, input_shape, candidate: int) -> PackedEnsemble:
    """The packed ensemble a finished packed run stored (the chosen ``candidate``, as members.json names it)."""
    path = run_dir / MEMBERS_FILE
    if not path.is_file():
        raise RunDirError(f"{path} does not exist: the run has not finished (evo-subens resume {run_dir})")
    return stored_packed(cfg, parent, input_shape, candidate, path)

