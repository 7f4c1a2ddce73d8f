"""Matched-budget baselines, run from the same configs and CLI as the subnetwork method.

``method`` picks one (the ``baseline`` section configures it); every method spends the budget of
``baseline.budget_epochs`` training epochs (0 = what the subnetwork method spends under the same config)
with the ``parent`` training settings (optimizer, lr, batch size, schedule):

- ``single``: one model trained for the whole budget;
- ``deep_ensemble``: ``members`` models from independent initialisations, budget split evenly;
- ``bagging``: the same, each model on its own random ``bagging_share`` of the training split;
- ``mc_dropout``: one model with dropout, ``mc_samples`` test passes with dropout active, averaged
  (Gal and Ghahramani, 2016);
- ``snapshot``: one model, cyclic cosine learning rate restarted ``members`` times, a snapshot at the end
  of each cycle (Huang et al., 2017);
- ``fge``: fast geometric ensembling (Garipov et al., 2018): a model pretrained on the budget left over by
  the cycles, then ``members`` cycles of a linear learning rate between ``fge_lr_max`` and ``fge_lr_min``
  with a snapshot at each cycle's minimum (the half cycle after the last snapshot is not trained).

Each method returns a :class:`BaselineOutput`; :func:`run_baseline` writes it as a run directory with
the same ``metrics.json`` keys as a subnetwork run (``ensemble``, ``members``, ``growth``, ``diversity``,
``test_samples``) plus ``method`` and ``cost``.
"""

from __future__ import annotations

import dataclasses
import functools
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch
from torch import nn

from .calibration import temperature_scaled
from ...core.config import RunConfig, TrainConfig
from ...core.config import baseline_budget
from .cost import cost_record
from .data import DatasetSplits, Split
from ...errors import ConfigError
from .models import build_model
from ...nn import count_parameters, state_copy
from ...core.progress import run_seconds, say
from ...core.rundir import write_json, write_state
from ...core.worker import numerics
from ...core.state import RunResult
from .results import ensemble_test_metrics
from .training import lr_factor, predict_members, predict_with_features, train

Progress = Callable[[str], None]


@dataclass
class BaselineOutput:
    """What a baseline trained and predicted on the test split."""

    states: list[dict[str, torch.Tensor]]  # weights of each trained model or snapshot
    models: list[dict]                      # how each of them was trained (epochs, seed, samples)
    test_probs: list[torch.Tensor]          # one per member (MC dropout: one per stochastic pass)
    test_features: list[torch.Tensor]       # penultimate features, for CKA
    cost: dict


def _quiet(line: str) -> None:
    pass


def member_seed(seed: int, index: int) -> int:
    """Seed of a baseline's ``index``-th model, snapshot phase or stochastic pass, distinct per run seed."""
    return seed * 1000 + index


def _train_cfg(cfg: RunConfig, epochs: int, **changes) -> TrainConfig:
    return dataclasses.replace(cfg.parent, epochs=epochs, **changes)


def _fresh_model(cfg: RunConfig, data: DatasetSplits, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(mc_model_config(cfg) if cfg.method == "mc_dropout" else cfg.model,
                       data.input_shape, data.num_classes)


def _reporter(progress: Progress, label: str, epochs: int,
              also: Callable[[int], None] | None = None) -> Callable[[int, float, float], None]:
    def report(epoch: int, loss: float, seconds: float) -> None:
        if also is not None:
            also(epoch)
        progress(f"[{label}] epoch {epoch + 1}/{epochs}  loss {loss:.4f}  ({seconds:.1f}s)")

    return report


def _predict(cfg: RunConfig, data: DatasetSplits, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return predict_with_features(model, data.test.x, cfg.search.eval_batch_size)


def _predict_states(cfg: RunConfig, data: DatasetSplits, states: list[dict]) -> tuple[list, list]:
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    return predict_members(model, states, data.test.x, cfg.search.eval_batch_size)


def _independent(cfg: RunConfig, data: DatasetSplits, seed: int, splits: list[Split], epochs: int,
                 progress: Progress) -> BaselineOutput:
    """One model per split, each from its own initialisation and batch order."""
    states, models, probs, features, passes = [], [], [], [], 0
    for i, split in enumerate(splits):
        model_seed = seed if len(splits) == 1 else member_seed(seed, i)
        model = _fresh_model(cfg, data, model_seed)
        train(model, split, _train_cfg(cfg, epochs), seed=model_seed, augment=cfg.data.augment,
              on_epoch=_reporter(progress, f"{cfg.method} {i + 1}/{len(splits)}", epochs))
        p, f = _predict(cfg, data, model)
        states.append(state_copy(model))
        models.append({"epochs": epochs, "seed": model_seed, "train_samples": len(split)})
        probs.append(p)
        features.append(f)
        passes += epochs * len(split)
    cost = cost_record(epochs * len(splits), passes, len(splits) * len(data.test))
    return BaselineOutput(states, models, probs, features, cost)


def train_single(cfg: RunConfig, data: DatasetSplits, seed: int, progress: Progress = _quiet) -> BaselineOutput:
    """One model trained for the whole budget (with the run seed it is the subnetwork run's parent)."""
    return _independent(cfg, data, seed, [data.train], baseline_budget(cfg), progress)


def train_deep_ensemble(cfg: RunConfig, data: DatasetSplits, seed: int,
                        progress: Progress = _quiet) -> BaselineOutput:
    """``members`` independently initialised models, each trained budget // members epochs."""
    members = cfg.baseline.members
    return _independent(cfg, data, seed, [data.train] * members, baseline_budget(cfg) // members, progress)


def bagging_subsets(n: int, share: float, members: int, seed: int) -> list[np.ndarray]:
    """Sorted training indices of each bagged model: ``round(share * n)`` drawn without replacement."""
    rng = np.random.default_rng([seed, 3])
    return [np.sort(rng.choice(n, round(share * n), replace=False)) for _ in range(members)]


def train_bagging(cfg: RunConfig, data: DatasetSplits, seed: int, progress: Progress = _quiet) -> BaselineOutput:
    """``members`` models, each on its own random share of the training split, budget split evenly."""
    members = cfg.baseline.members
    subsets = bagging_subsets(len(data.train), cfg.baseline.bagging_share, members, seed)
    splits = [data.train.subset(s) for s in subsets]
    return _independent(cfg, data, seed, splits, baseline_budget(cfg) // members, progress)


def mc_model_config(cfg: RunConfig):
    """The model config of ``mc_dropout``: ``model`` with ``baseline.dropout`` as its dropout keyword."""
    if cfg.baseline.dropout == 0:
        return cfg.model
    return dataclasses.replace(cfg.model, kwargs=dict(cfg.model.kwargs, dropout=cfg.baseline.dropout))


def _dropout_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]


def check_baseline(cfg: RunConfig, data: DatasetSplits) -> None:
    """Checks that need the data's shapes (single fields and budgets are checked on load)."""
    if cfg.method != "mc_dropout":
        return
    try:
        model = build_model(mc_model_config(cfg), data.input_shape, data.num_classes)
    except ConfigError as exc:
        if cfg.baseline.dropout == 0:
            raise
        raise ConfigError("baseline.dropout", f"0 (use the model's own dropout), or a model that takes a "
                                              f"'dropout' keyword ({exc.expected})", cfg.baseline.dropout) from None
    if not _dropout_modules(model):
        raise ConfigError("baseline.dropout", "a probability > 0 for mc_dropout (the model has no active "
                                              "Dropout layer; set it here or in model.kwargs)", cfg.baseline.dropout)


@contextmanager
def dropout_active(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with its dropout layers sampling even in evaluation mode.

    The prediction helpers put the model in eval mode; pinning the dropout layers' ``train`` keeps them
    stochastic while everything else (e.g. batch norm) evaluates normally.
    """
    layers = _dropout_modules(model)
    for layer in layers:
        layer.training = True
        layer.train = lambda mode=True, layer=layer: layer
    try:
        yield model
    finally:
        for layer in layers:
            del layer.train
            layer.training = False


def train_mc_dropout(cfg: RunConfig, data: DatasetSplits, seed: int,
                     progress: Progress = _quiet) -> BaselineOutput:
    """One model with dropout trained for the budget; ``mc_samples`` test passes with dropout on (0: off)."""
    check_baseline(cfg, data)
    epochs = baseline_budget(cfg)
    model = _fresh_model(cfg, data, seed)
    train(model, data.train, _train_cfg(cfg, epochs), seed=seed, augment=cfg.data.augment,
          on_epoch=_reporter(progress, cfg.method, epochs))
    samples = cfg.baseline.mc_samples
    probs, features = [], []
    if samples == 0:
        p, f = _predict(cfg, data, model)
        probs.append(p)
        features.append(f)
    with dropout_active(model):
        for k in range(samples):
            torch.manual_seed(member_seed(seed, k))  # each pass's dropout masks are a function of the seed
            p, f = _predict(cfg, data, model)
            probs.append(p)
            features.append(f)
    cost = cost_record(epochs, epochs * len(data.train), max(1, samples) * len(data.test))
    models = [{"epochs": epochs, "seed": seed, "train_samples": len(data.train), "mc_samples": samples}]
    return BaselineOutput([state_copy(model)], models, probs, features, cost)


def train_snapshot(cfg: RunConfig, data: DatasetSplits, seed: int, progress: Progress = _quiet) -> BaselineOutput:
    """Snapshot ensemble: ``members`` cosine cycles of budget // members epochs, a snapshot after each."""
    members = cfg.baseline.members
    cycle = baseline_budget(cfg) // members
    epochs = cycle * members
    model = _fresh_model(cfg, data, seed)
    states, models = [], []

    def snapshot(epoch: int) -> None:
        if (epoch + 1) % cycle == 0:
            states.append(state_copy(model))
            models.append({"epochs": epoch + 1, "seed": seed, "train_samples": len(data.train)})

    train(model, data.train, _train_cfg(cfg, epochs), seed=seed, augment=cfg.data.augment,
          schedule=functools.partial(lr_factor, "cyclic_cosine", cycles=members),
          on_epoch=_reporter(progress, cfg.method, epochs, snapshot))
    probs, features = _predict_states(cfg, data, states)
    return BaselineOutput(states, models, probs, features,
                          cost_record(epochs, epochs * len(data.train), members * len(data.test)))


def fge_epochs(cfg: RunConfig) -> tuple[int, int]:
    """(pretraining epochs, cyclic epochs) of fast geometric ensembling under ``cfg``."""
    cycle, members = cfg.baseline.fge_cycle_epochs, cfg.baseline.members
    cyclic = members * cycle - cycle // 2  # training stops at the last snapshot, mid-cycle
    return baseline_budget(cfg) - cyclic, cyclic


def train_fge(cfg: RunConfig, data: DatasetSplits, seed: int, progress: Progress = _quiet) -> BaselineOutput:
    """Fast geometric ensembling: pretrain, then cyclic linear lr with a snapshot at each minimum."""
    base = cfg.baseline
    pretrain, cyclic = fge_epochs(cfg)
    model = _fresh_model(cfg, data, seed)
    train(model, data.train, _train_cfg(cfg, pretrain), seed=seed, augment=cfg.data.augment,
          on_epoch=_reporter(progress, "fge pretrain", pretrain))
    states, models = [], []
    half = base.fge_cycle_epochs // 2

    def snapshot(epoch: int) -> None:
        if (epoch + 1 - half) % base.fge_cycle_epochs == 0:
            states.append(state_copy(model))
            models.append({"epochs": pretrain + epoch + 1, "seed": seed, "train_samples": len(data.train)})

    cycle_steps = base.fge_cycle_epochs * -(-len(data.train) // cfg.parent.batch_size)
    low = base.fge_lr_min / base.fge_lr_max

    def schedule(step: int, total_steps: int) -> float:
        # Cycles are fixed in length; the run stops half a cycle early, so total_steps is not a whole number
        # of cycles.
        return lr_factor("cyclic_linear", step % cycle_steps, cycle_steps, low=low)

    train(model, data.train, _train_cfg(cfg, cyclic, lr=base.fge_lr_max), seed=member_seed(seed, 1),
          augment=cfg.data.augment, schedule=schedule, on_epoch=_reporter(progress, "fge cycles", cyclic, snapshot))
    probs, features = _predict_states(cfg, data, states)
    epochs = pretrain + cyclic
    return BaselineOutput(states, models, probs, features,
                          cost_record(epochs, epochs * len(data.train), len(states) * len(data.test)))


BASELINES: dict[str, Callable[..., BaselineOutput]] = {
    "single": train_single, "deep_ensemble": train_deep_ensemble, "bagging": train_bagging,
    "mc_dropout": train_mc_dropout, "snapshot": train_snapshot, "fge": train_fge,
}


def baseline_metrics(cfg: RunConfig, data: DatasetSplits, output: BaselineOutput) -> dict:
    """``metrics.json`` of a baseline run: the subnetwork run's keys where they mean something, plus cost."""
    members = [{"member": i} for i in range(len(output.test_probs))]
    return {"method": cfg.method,
            **ensemble_test_metrics(output.test_probs, output.test_features, data.test.y, members),
            "cost": output.cost}


def _temperature(cfg: RunConfig, data: DatasetSplits, output: BaselineOutput) -> dict | None:
    """Temperature scaling of the ensemble, fitted on the validation split, as subnetwork runs record it
    (None for MC dropout, whose members are stochastic passes rather than weight sets)."""
    if cfg.method == "mc_dropout":
        return None
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    validation, _ = predict_members(model, output.states, data.validation.x, cfg.search.eval_batch_size)
    return {"ensemble": temperature_scaled(torch.stack(validation).mean(dim=0), data.validation.y,
                                           torch.stack(output.test_probs).mean(dim=0), data.test.y)}


def _summary(cfg: RunConfig, metrics: dict) -> str:
    m, cost = metrics["ensemble"], metrics["cost"]
    # One member has no pair to disagree with: not applicable, not zero.
    spread = (f"{metrics['diversity']['disagreement']['mean']:.4f}" if len(metrics["members"]) > 1
              else "n/a (one member)")
    return (f"{cfg.method} ({len(metrics['members'])} members)  test accuracy {m['accuracy']:.4f}  "
            f"nll {m['nll']:.4f}  ece {m['ece']:.4f}  disagreement {spread}\n"
            f"cost: {cost['train_epochs']} train epochs, {cost['train_sample_passes']:,} train sample-passes, "
            f"{cost['eval_forward_passes']:,} eval forward passes")


def run_baseline(cfg: RunConfig, run_dir: Path, data: DatasetSplits, progress: Progress = say):
    """Train and test the baseline ``cfg.method`` into ``run_dir`` (config.yaml already written): member
    weights under members/, members.json, metrics.json. Returns a :class:`~evo_subens.core.state.RunResult`
    with an empty population (baselines have no search)."""
    check_baseline(cfg, data)
    progress(f"[run] {run_dir}")
    progress(f"[data] {data.name}: train {len(data.train):,}  validation {len(data.validation):,}  "
             f"test {len(data.test):,}")
    params = count_parameters(build_model(cfg.model, data.input_shape, data.num_classes))
    progress(f"[{cfg.method}] {params:,} parameters, budget {baseline_budget(cfg)} epochs")
    output = BASELINES[cfg.method](cfg, data, cfg.seed, progress)
    (run_dir / "members").mkdir(exist_ok=True)
    for i, state in enumerate(output.states):
        write_state(run_dir / "members" / f"{i}.pt", state)
    write_json(run_dir / "members.json", [dict(info, weights=f"members/{i}.pt")
                                          for i, info in enumerate(output.models)])
    metrics = baseline_metrics(cfg, data, output)
    metrics["temperature"] = _temperature(cfg, data, output)
    metrics["numerics"] = numerics()
    write_json(run_dir / "metrics.json", metrics)
    progress(_summary(cfg, metrics))
    progress(f"[run] results in {run_dir} ({run_seconds():.0f}s)")
    return RunResult(run_dir, metrics, pd.DataFrame(), [])
