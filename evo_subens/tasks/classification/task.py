"""Supervised classification as a task: a classifier parent, scored by validation accuracy / NLL, members
averaged in probability space.

    >>> task = ClassificationTask(load_config("configs/default.yaml"), print)
    >>> task.load(); model = task.new_model(); task.train_parent(model)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ...core.search import CandidateRecord, Ranking, select_members
from ...families import make_family
from ..base import Task
from .cost import subnetwork_cost
from ...core.rundir import write_json
from ...data_info import DATA_FILE
from ...errors import ConfigError, DataError, UserError
from .data import load_dataset
from .splits import DatasetSplits, Split, describe_preprocessing, hold_out, split_own_data
from .tabular import as_arrays, save_npz
from .evaluation import EvaluationPayload
from .metrics import VALIDATION_METRICS, classification_metrics, nll
from .models import build_model
from ...nn import count_parameters, load_parent_state
from .results import ensemble_test_metrics, summary_table, validation_metrics, verdict, warnings, with_parent
from .selection import accept_members, greedy_selection
from .training import predict_members, predict_probs, train
from ...core.progress import Steps


# Where data given in memory is saved in the run directory.
IN_MEMORY_FILE = "data.npz"
# A loaded parent whose validation accuracy closes less than this share of the gap between guessing the
# commonest class and perfect is reported as near chance.
NEAR_CHANCE = 0.1


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is unreadable ({exc}); it describes the run's data") from None


def check_recorded_data(run_dir: Path, data: DatasetSplits) -> None:
    """A :class:`DataError` when ``data`` is not what ``run_dir`` recorded in its ``data.json`` (run
    directories from before ``data.json`` have nothing to compare with)."""
    path = Path(run_dir) / DATA_FILE
    if not path.is_file():
        return
    recorded = read_json(path)
    if recorded.get("fingerprint") != data.fingerprint():
        sizes = {"train": len(data.train), "validation": len(data.validation), "test": len(data.test)}
        raise DataError(f"the data of {run_dir} no longer loads to what the run was made with ({data.name}: "
                        f"splits {sizes}, recorded {recorded.get('sizes')}; fingerprints differ): was a data "
                        f"file changed or replaced?")


class ClassificationTask(Task):
    """Images or signals with class labels: train / validation / test splits of one dataset."""

    name = "classification"
    metrics = VALIDATION_METRICS

    def load(self, data: object | None = None) -> None:
        data_cfg = self.cfg.data
        self.in_memory = None
        if data is not None:
            given = [f"data.{name}" for name in ("test_path", "target", "loader") if getattr(data_cfg, name)]
            if given:
                raise DataError(f"{given[0]} is set, but the data is given in memory (data=...); give a test "
                                f"set there as (x, y, x_test, y_test)")
            self.in_memory = as_arrays(data)
            data_cfg.name, data_cfg.path = "npz", None
            self.progress("[data] loading the arrays given in memory")
            self.data = split_own_data("npz", self.in_memory["x"], self.in_memory["y"],
                                       self.in_memory.get("x_test"), self.in_memory.get("y_test"), data_cfg,
                                       "in-memory data")
        else:
            # Recorded absolute, so report, resume and load_ensemble find the files from any folder.
            for name in ("path", "test_path"):
                if getattr(data_cfg, name) is not None:
                    setattr(data_cfg, name, str(Path(getattr(data_cfg, name)).expanduser().absolute()))
            self.progress(f"[data] loading {data_cfg.name}" + (f" from {data_cfg.path}" if data_cfg.path else ""))
            self.data = load_dataset(data_cfg)
        if data_cfg.augment and len(self.data.input_shape) != 3:
            raise ConfigError("data.augment", f"false for inputs that are not (channels, height, width) images "
                                              f"({self.data.name} has shape {self.data.input_shape})", True)
        # Decisions see the head of the validation split; the tail is held back to check them.
        self.selection, self.holdout = hold_out(self.data.validation, self.cfg.ensemble.holdout)

    def record_data(self, run_dir: Path) -> None:
        if self.in_memory is not None:
            path = Path(run_dir).absolute() / IN_MEMORY_FILE
            save_npz(self.in_memory, path)
            self.cfg.data.path = str(path)
            self.progress(f"[data] the in-memory data is saved as {path} (report, resume and grow reload it)")
        write_json(Path(run_dir) / DATA_FILE, self.data.description())

    def check_data(self, run_dir: Path) -> None:
        check_recorded_data(run_dir, self.data)

    def describe_data(self) -> str:
        data = self.data
        held = f" + {len(self.holdout):,} held back" if self.holdout is not None else ""
        streamed = (f"  (training split streamed from its files by {self.cfg.data.num_workers} DataLoader workers; "
                    f"validation and test held compact)" if data.streamed else "")
        return (f"[data] {data.name}: train {len(data.train):,}  validation {len(self.selection):,}{held}  "
                f"test {len(data.test):,}{streamed}")

    def scored_on(self) -> str:
        if self.holdout is None:
            return f"validation split ({len(self.selection):,} rows)"
        return f"selection split ({len(self.selection):,} of {len(self.data.validation):,} validation rows)"

    def new_model(self) -> nn.Module:
        return build_model(self.cfg.model, self.data.input_shape, self.data.num_classes)

    def load_parent(self, path: str | Path, model: nn.Module) -> None:
        load_parent_state(path, model)

    def _against_chance(self, model: nn.Module) -> tuple[dict[str, float], float, bool]:
        """The model's selection-split metrics, the accuracy of always guessing the commonest class, and
        whether the model is near that chance level."""
        split = self.selection
        val = classification_metrics(predict_probs(model, split.x, self.cfg.search.eval_batch_size), split.y)
        majority = float(torch.bincount(split.y, minlength=self.data.num_classes).max()) / len(split)
        return val, majority, val["accuracy"] < majority + NEAR_CHANCE * (1 - majority)

    def check_loaded_parent(self, model: nn.Module) -> None:
        val, majority, near_chance = self._against_chance(model)
        # A trained parent's last epoch line shows this; the reference record may be a tuned parent.
        self.progress(f"[parent] on the {self.scored_on()}: accuracy {val['accuracy']:.4f}  nll {val['nll']:.4f}")
        uniform_nll = math.log(self.data.num_classes)
        if near_chance or val["nll"] > uniform_nll:
            what = (f"scores near chance (accuracy {val['accuracy']:.4f}; always guessing the commonest class: "
                    f"{majority:.4f})" if near_chance else
                    f"has a worse NLL ({val['nll']:.3f}) than a uniform guess ({uniform_nll:.3f})")
            self.progress(f"[parent] warning: the loaded parent {self.cfg.model.parent_path} {what} on this run's "
                          f"validation split. Was it trained on differently preprocessed inputs? This run feeds it "
                          f"{describe_preprocessing(self.data)}; a parent must see inputs prepared the way it "
                          f"was trained on (data.scale, data.standardize, data.mean / data.std)")

    def check_parent_learned(self, model: nn.Module) -> None:
        """Stop the run before the search when the parent scores near chance on the selection split (or its
        training loss never fell): children of such a parent cannot make a useful ensemble."""
        val, majority, near_chance = self._against_chance(model)
        losses = getattr(self, "parent_losses", [])  # set by train_parent; a loaded parent has none
        flat = len(losses) > 1 and min(losses[1:]) >= losses[0]
        if not (near_chance or flat):
            return
        seen = (f"validation accuracy {val['accuracy']:.4f} (always guessing the commonest class: {majority:.4f})"
                + (f", training loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} epochs" if losses else ""))
        if self.cfg.model.parent_path:
            raise UserError(f"the loaded parent {self.cfg.model.parent_path} did not learn this data: {seen}. "
                            f"Give a parent trained on this data and prepared the same way (this run feeds it "
                            f"{describe_preprocessing(self.data)}: data.scale, data.standardize, data.mean / "
                            f"data.std)")
        p = self.cfg.parent
        raise UserError(f"the parent did not learn: {seen}. An ensemble of its children would be as poor; change "
                        f"the parent's training and run again: another parent.lr (now {p.lr:g}; a loss stuck "
                        f"near its start means a rate far too large or too small), more parent.epochs "
                        f"(now {p.epochs}), or inputs on a unit scale (data.standardize: true, data.scale; now "
                        f"{describe_preprocessing(self.data)})")

    def pool_outputs(self, states: Sequence[dict]) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Probabilities of each weight set on the selection split and on the held-back part (None where
        nothing is held back): what tuned scoring pools."""
        selection = self.predict(states, self.selection.x)
        holdout = self.predict(states, self.holdout.x) if self.holdout is not None else [None] * len(states)
        return selection, holdout

    def pool_loss(self, probs: torch.Tensor) -> float:
        """NLL of averaged probabilities on the selection split: the loss tuned scoring's ensemble minimises."""
        return nll(probs, self.selection.y)

    def holdout_metrics(self, probs: torch.Tensor) -> dict[str, float]:
        """Accuracy and NLL of averaged probabilities on the held-back split."""
        return classification_metrics(probs, self.holdout.y)

    def train_parent(self, model: nn.Module) -> None:
        cfg, data = self.cfg, self.data
        # Each epoch is scored on the rows candidates are scored on, so the last epoch's numbers compare
        # with theirs; the held-back rows stay unseen until the checks that use them.
        split = self.selection
        self.progress(f"[parent] training {count_parameters(model):,} parameters for {cfg.parent.epochs} epochs "
                      f"on {len(data.train):,} samples; val = the {self.scored_on()}")

        def report(epoch: int, loss: float, seconds: float) -> None:
            val = classification_metrics(predict_probs(model, split.x, cfg.search.eval_batch_size), split.y)
            model.train()
            epochs.step(f"[parent] epoch {epoch + 1}/{cfg.parent.epochs}  loss {loss:.4f}  "
                        f"val acc {val['accuracy']:.4f}  val nll {val['nll']:.4f}  ({seconds:.1f}s)")

        losses: list[float] = []

        def record(epoch: int, loss: float, seconds: float) -> None:
            losses.append(loss)
            report(epoch, loss, seconds)

        with Steps(self.progress, cfg.parent.epochs, "[parent]", "epochs") as epochs:
            train(model, data.train, cfg.parent, seed=cfg.seed, on_epoch=record, augment=cfg.data.augment)
        self.parent_losses = losses

    def worker_payload(self, parent_state: dict, parent_id: str) -> EvaluationPayload:
        cfg, data = self.cfg, self.data
        payload = EvaluationPayload(
            model=cfg.model, input_shape=data.input_shape, num_classes=data.num_classes, parent_state=parent_state,
            parent_id=parent_id, children=cfg.children, val_x=self.selection.x, val_y=self.selection.y,
            batch_size=cfg.search.eval_batch_size, threads=cfg.workers.threads_per_actor,
            use_gpu=cfg.workers.num_gpus_per_actor > 0, activation_cache_mb=cfg.workers.activation_cache_mb,
            autocast=cfg.workers.autocast, stack_candidates=cfg.workers.stack_candidates,
            finetune=cfg.finetune if cfg.finetune.epochs else None,
            tune_candidates=cfg.search.scoring == "tuned" and not make_family(cfg.children).trains_children,
            augment=cfg.data.augment)
        if make_family(cfg.children).trains_children or cfg.finetune.epochs:
            payload.train_x, payload.train_y = data.train.x, data.train.y
        return payload

    def predict(self, states: Sequence[dict], x: torch.Tensor) -> list[torch.Tensor]:
        """Each weight set's probabilities on ``x`` (no penultimate features: only diversity needs them)."""
        return predict_members(self.new_model(), list(states), x, self.cfg.search.eval_batch_size, features=False)[0]

    def holdout_check(self, weights) -> dict:
        if self.holdout is None or weights is None:
            return {"holdout_accuracy": None, "holdout_nll": None}
        held = classification_metrics(self.predict([weights()], self.holdout.x)[0], self.holdout.y)
        return {"holdout_accuracy": held["accuracy"], "holdout_nll": held["nll"]}

    def select(self, records: list[CandidateRecord], count: int, prior: list[CandidateRecord],
               states_of) -> tuple[list[CandidateRecord], dict | None]:
        """Selection uses the validation split only (its selection part). The comparison of both rules (each
        rule's ensemble, before fine-tuning, on validation and test) is made once both have chosen, so the
        test split cannot influence either choice. A grown ensemble adds the best new candidates by
        fitness."""
        cfg, selection = self.cfg, self.selection
        ranking = Ranking(self.metrics, cfg.search.fitness)
        if prior:
            return select_members(records, len(prior) + count, ranking, prior)[len(prior):], None
        topk = select_members(records, count, ranking)
        pool = select_members(records, cfg.ensemble.pool or 4 * count, ranking)
        candidates = list({r.candidate: r for r in pool + topk}.values())
        states = dict(zip((r.candidate for r in candidates), states_of(candidates)))

        def outputs(chosen: list[CandidateRecord], split: Split) -> dict[int, torch.Tensor]:
            """Probabilities on ``split`` of each distinct candidate in ``chosen``, each predicted once."""
            distinct = list({r.candidate: r for r in chosen})
            return dict(zip(distinct, self.predict([states[c] for c in distinct], split.x)))

        validation = outputs(candidates, selection)
        greedy = [pool[j] for j in greedy_selection([validation[r.candidate] for r in pool], selection.y, count)]
        chosen = {"topk": topk, "greedy": greedy}
        predicted = {"validation": (validation, selection),
                     "test": (outputs(topk + greedy, self.data.test), self.data.test)}
        comparison = {}
        for rule, ensemble in chosen.items():
            comparison[rule] = {"candidates": [r.candidate for r in ensemble]}
            for name, (probs, split) in predicted.items():
                ensemble_probs = torch.stack([probs[r.candidate] for r in ensemble]).mean(dim=0)
                comparison[rule][name] = classification_metrics(ensemble_probs, split.y)
        return chosen[cfg.ensemble.selection], comparison

    def prefers_parent(self, parent: dict, members: Sequence[dict]) -> bool:
        """Under acceptance, the parent is a candidate member: it replaces an ensemble whose selection-split
        NLL is above its own (without acceptance every selected member joins, as configured)."""
        if not self.cfg.ensemble.acceptance or not members:
            return False
        parent_probs, *member_probs = self.predict([parent, *members], self.selection.x)
        ensemble = torch.stack([p.double() for p in member_probs]).mean(dim=0)
        return self.pool_loss(parent_probs.double()) < self.pool_loss(ensemble)

    def accept(self, kept: Sequence[dict], new: Sequence[dict]) -> list[int]:
        if not self.cfg.ensemble.acceptance:
            return list(range(len(new)))
        x, y = self.selection.x, self.selection.y
        return accept_members(self.predict(kept, x), self.predict(new, x), y)

    def results(self, parent: nn.Module, member_states: list[dict], member_ids: list[int]) -> dict:
        data, batch = self.data, self.cfg.search.eval_batch_size
        test_x, test_y = data.test.x, data.test.y
        self.progress(f"[test] parent, {len(member_states)} members and their ensemble on {len(test_y):,} test "
                      f"samples")
        member_probs, member_features = predict_members(self.new_model(), member_states, test_x, batch)
        parent_probs = predict_probs(parent, test_x, batch)
        ensemble = ensemble_test_metrics(member_probs, member_features, test_y,
                                         [{"candidate": c} for c in member_ids])
        metrics = with_parent(parent_probs, test_y, ensemble)
        test_probs = {"parent": parent_probs, "ensemble": torch.stack(member_probs).mean(dim=0)}
        validation = data.validation
        metrics.update(validation_metrics(
            validation, len(self.selection), self.holdout is not None,
            predict_probs(parent, validation.x, batch), self.predict(member_states, validation.x), metrics,
            test_probs, test_y))
        return metrics

    def cost(self, *, records, selected: int, members: int) -> dict:
        return subnetwork_cost(self.cfg, self.data, candidates=len(records), selected=selected, members=members,
                               validation=len(self.selection))

    def verdict(self, metrics: dict) -> dict:
        return verdict(metrics)

    def summary(self, metrics: dict, offered: int) -> list[str]:
        return [summary_table(metrics, offered, self.cfg.search.generations, self.cfg.search.patience)]

    def warnings(self, metrics: dict) -> list[str]:
        return warnings(metrics)

    def diagnostics(self, rows: list[dict]) -> list[str]:
        from ...core.divergence import summary_lines

        return summary_lines(rows, self.data.num_classes, make_family(self.cfg.children))

    def run_baseline(self, run_dir: Path):
        from .baselines import run_baseline

        return run_baseline(self.cfg, run_dir, self.data, self.progress)

    def run_packed(self, run_dir: Path, parent: nn.Module):
        from .packed_run import run_packed

        return run_packed(self.cfg, run_dir, self, parent)

    def check_baseline(self) -> None:
        if self.cfg.method == "packed":  # an architecture or widths it cannot cut fail before the run directory
            from ...packed import cut_parent

            p = self.cfg.packed
            cut_parent(self.new_model(), self.data.input_shape, p.members, overlap=p.overlap)
            return
        from .baselines import check_baseline

        check_baseline(self.cfg, self.data)
