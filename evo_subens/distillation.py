"""``evo-subens distill``: one student network trained on a finished classification run's ensemble, to keep
most of the ensemble's gain over its parent at one model's inference cost.

The student has the parent's architecture and starts from the parent's weights (``parent.pt``); it is
trained on the run's training split to match the ensemble's averaged probabilities (its soft targets):

    loss = alpha * KL(ensemble || softmax(student)) + (1 - alpha) * cross-entropy(student, label)

``alpha`` 1 (the default) trains on the soft targets alone. No temperature is applied: the soft targets
are already the mean of the members' probabilities, softer than any one member's. Training is SGD with a
one-cycle schedule (peak ``lr``) and the parent's batch size, momentum and weight decay, batches drawn
with the run's seed: the same run directory and options give the same student bit for bit (on the same
torch build and CPU; the thread count is the run's ``workers.driver_threads``).

The student costs what the parent costs: M times less than an ensemble of M full-size members, but more
than a packed run's ensemble (``method: packed``), whose members are narrow; the table gives the parameter
counts of all three.

It writes ``RUN_DIR/student/student.pt`` (the state_dict) and ``RUN_DIR/student/metrics.json`` (the
options, and the test metrics of parent, ensemble and student with temperature scaling fitted on the
validation split), and prints them as a table.

    >>> import evo_subens
    >>> metrics = evo_subens.distill("runs/packed-s0-20261203-163703", epochs=10)
    >>> metrics["test"]["student"]["nll"], metrics["test"]["ensemble"]["nll"]
    >>> student = evo_subens.load_student("runs/packed-s0-20261203-163703")   # a one-member Ensemble
    >>> student.predict_proba(x)

    $ evo-subens distill runs/packed-s0-20261203-163703 --epochs 10
    $ evo-subens export runs/packed-s0-20261203-163703 --student --format torchscript
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .core.config import RunConfig, TrainConfig, config_from_dict
from .core.logs import read_run_config
from .core.progress import Progress, Steps, say
from .core.rundir import write_json, write_state
from .core.worker import numerics, torch_threads
from .ensemble import Ensemble, _data_info, load_ensemble
from .errors import RunDirError, UserError
from .nn import count_parameters, load_parent_state, load_state_file, state_copy
from .tasks.classification.models import build_model

__all__ = ["STUDENT_DIR", "distill", "load_student"]

STUDENT_DIR = "student"
STUDENT_FILE = f"{STUDENT_DIR}/student.pt"
METRICS_FILE = f"{STUDENT_DIR}/metrics.json"
MODELS = ("parent", "ensemble", "student")


def distill(run_dir: str | Path, *, epochs: int = 10, lr: float = 0.05, alpha: float = 1.0,
            progress: Progress = say) -> dict[str, Any]:
    """Train a student on the ensemble of the finished classification run ``run_dir`` (see the module
    docstring), write ``student/student.pt`` and ``student/metrics.json`` there (an earlier student is
    replaced), print the comparison table and return the metrics as written.

    ``epochs`` (>= 1) passes over the training split at peak learning rate ``lr`` (> 0); ``alpha`` in
    [0, 1] weighs the soft targets against the true labels. Bad options, a missing, unfinished or RL run
    and a run without ``parent.pt`` are :class:`~evo_subens.errors.UserError`\\ s, raised before anything
    slow starts."""
    options = _check_options(epochs, lr, alpha)
    run_dir = Path(run_dir)
    cfg = _finished_run(run_dir, "distill")
    if not (run_dir / "parent.pt").is_file():
        raise RunDirError(f"{run_dir / 'parent.pt'} does not exist: the student starts from the parent's "
                          f"weights, and this {cfg.method} run stored no parent")
    started = time.perf_counter()
    # Forked: building models draws from torch's global generator, and the caller's draws stay their own.
    with torch_threads(cfg.workers.driver_threads), torch.random.fork_rng(devices=[]):
        return _distill(run_dir, cfg, options, progress, started)


def load_student(run_dir: str | Path) -> Ensemble:
    """The student ``evo-subens distill`` trained for ``run_dir``, as a one-member :class:`Ensemble` (eval
    mode) built as :func:`~evo_subens.ensemble.load_ensemble` builds the run's: the same input form,
    transform, classes and config, the run's parent as ``parent``; so ``predict_proba`` and the exporters
    work on it unchanged. No student yet is a :class:`~evo_subens.errors.RunDirError` saying how to make one."""
    run_dir = Path(run_dir)
    cfg = config_from_dict(read_run_config(run_dir))
    _classification(run_dir, cfg, "load_student")
    path = run_dir / STUDENT_FILE
    if not path.is_file():
        raise RunDirError(f"{path} does not exist: the run has no student yet (evo-subens distill {run_dir})")
    info = _data_info(run_dir, cfg)
    student = build_model(cfg.model, info.input_shape, info.num_classes)
    try:
        student.load_state_dict(load_state_file(path))
    except Exception as exc:  # the readers and load_state_dict raise many types on foreign files
        raise RunDirError(f"{path} is unreadable or does not fit the run's {_architecture(cfg)} architecture "
                          f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); "
                          f"distill again (evo-subens distill {run_dir})") from None
    parent = None
    if (run_dir / "parent.pt").is_file():
        parent = build_model(cfg.model, info.input_shape, info.num_classes)
        load_parent_state(run_dir / "parent.pt", parent)
    return Ensemble([student.eval()], input_shape=info.input_shape, num_classes=info.num_classes,
                    transform=info.transform, classes=info.classes, config=cfg, parent=parent,
                    features=info.features, image=info.image)


# ------------------------------------------------------------------------------------------------ checks

def _check_options(epochs: Any, lr: Any, alpha: Any) -> dict[str, Any]:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise UserError(f"distill needs --epochs >= 1 (a whole number of passes over the training split), "
                        f"got {epochs!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise UserError(f"distill needs --lr > 0 (the peak one-cycle learning rate), got {lr!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise UserError(f"distill needs --alpha in [0, 1] (1: soft targets only, 0: true labels only), "
                        f"got {alpha!r}")
    return {"epochs": int(epochs), "lr": float(lr), "alpha": float(alpha)}


def _classification(run_dir: Path, cfg: RunConfig, what: str) -> None:
    if cfg.task != "classification":
        raise RunDirError(f"{run_dir} is a run of the {cfg.task} task: {what} works on classifier ensembles")


def _architecture(cfg: RunConfig) -> str:
    return cfg.model.architecture or cfg.model.name  # the registry name is unused where an architecture is given


def _finished_run(run_dir: Path, what: str) -> RunConfig:
    """The config of ``run_dir`` once it is known to be a finished classification run."""
    cfg = config_from_dict(read_run_config(run_dir))  # a missing or foreign directory is named first
    _classification(run_dir, cfg, what)
    if not (run_dir / "members.json").is_file():
        raise RunDirError(f"{run_dir} has no members.json: the run has not finished (evo-subens resume {run_dir})")
    return cfg


# ---------------------------------------------------------------------------------------------- distilling

def _distill(run_dir: Path, cfg: RunConfig, options: dict[str, Any], progress: Progress,
             started: float) -> dict[str, Any]:
    from .tasks import make_task
    from .tasks.classification.calibration import temperature_scaled
    from .tasks.classification.metrics import classification_metrics
    from .tasks.classification.training import predict_probs

    progress(f"[distill] {run_dir}: loading the ensemble and the run's data")
    ensemble = load_ensemble(run_dir)
    task = make_task(cfg, progress)
    task.load()
    task.check_data(run_dir)  # soft targets of other data would train a student of another problem
    data, batch = task.data, cfg.search.eval_batch_size

    student = build_model(cfg.model, data.input_shape, data.num_classes)
    load_parent_state(run_dir / "parent.pt", student)
    p = cfg.parent
    # SGD whatever optimiser trained the parent: lr is an SGD one-cycle peak, meaningless to Adam.
    train_cfg = TrainConfig(epochs=options["epochs"], batch_size=p.batch_size, lr=options["lr"],
                            lr_schedule="onecycle", optimizer="sgd", momentum=p.momentum, nesterov=p.nesterov,
                            weight_decay=p.weight_decay)
    augment = cfg.data.augment
    progress(f"[distill] student: the parent's {_architecture(cfg)} ({count_parameters(student):,} parameters), "
             f"from its weights, trained {options['epochs']} epoch(s) on {len(data.train):,} samples to match the "
             f"{ensemble.num_members}-member ensemble (alpha {options['alpha']:g}, SGD one-cycle lr "
             f"{options['lr']:g}" + (", augmented batches" if augment else "") + ")")
    losses = _train_student(student, ensemble, task, train_cfg, options["alpha"], cfg.seed, augment, progress)

    test, validation = data.test, data.validation
    progress(f"[distill] parent, ensemble and student on {len(test):,} test samples (temperature scaling fitted on "
             f"{len(validation):,} validation samples)")
    models = {"parent": ensemble.parent, "student": student}
    probs = {name: {"validation": predict_probs(model, validation.x, batch),
                    "test": predict_probs(model, test.x, batch)}
             for name, model in models.items()}
    probs["ensemble"] = {"validation": _ensemble_probs(ensemble, validation.x, batch),
                         "test": _ensemble_probs(ensemble, test.x, batch)}
    metrics = {
        "options": {**options, "seed": cfg.seed, "batch_size": train_cfg.batch_size, "optimizer": "sgd",
                    "lr_schedule": "onecycle", "momentum": train_cfg.momentum, "nesterov": train_cfg.nesterov,
                    "weight_decay": train_cfg.weight_decay, "augment": augment},
        "members": ensemble.num_members,
        "test": {name: classification_metrics(probs[name]["test"], test.y) for name in MODELS},
        "temperature": {name: temperature_scaled(probs[name]["validation"], validation.y, probs[name]["test"],
                                                 test.y) for name in MODELS},
        "parameters": {"parent": count_parameters(ensemble.parent), "ensemble": count_parameters(ensemble),
                       "student": count_parameters(student)},
    }
    metrics["kept"] = _kept(metrics["test"])
    metrics["training"] = {"losses": losses, "samples": len(data.train), "seconds": time.perf_counter() - started}
    metrics["numerics"] = numerics()

    (run_dir / STUDENT_DIR).mkdir(exist_ok=True)
    # Each file is written atomically; removing the old metrics first means an interrupted distill never
    # leaves a new student beside an earlier student's metrics.
    (run_dir / METRICS_FILE).unlink(missing_ok=True)
    write_state(run_dir / STUDENT_FILE, state_copy(student))
    write_json(run_dir / METRICS_FILE, metrics)
    for line in summary(metrics):
        progress(line)
    progress(f"[distill] wrote {run_dir / STUDENT_FILE} and {run_dir / METRICS_FILE} "
             f"({time.perf_counter() - started:.0f}s); evo_subens.load_student({str(run_dir)!r}) loads it, "
             f"evo-subens export {run_dir} --student --format torchscript exports it")
    return metrics


def _train_student(student: nn.Module, ensemble: Ensemble, task: Any, train_cfg: TrainConfig, alpha: float,
                   seed: int, augment: bool, progress: Progress) -> list[float]:
    """Train ``student`` in place on the task's training split against the ensemble's soft targets; returns
    each epoch's mean loss."""
    from .tasks.classification.metrics import classification_metrics
    from .tasks.classification.splits import Split
    from .tasks.classification.training import predict_probs, train

    data, batch = task.data, task.cfg.search.eval_batch_size
    train_split, selection = data.train, task.selection
    n = len(train_split)
    # train() hands the criterion each batch's "labels": with the sample positions as labels, the criterion
    # finds the batch's soft targets and true labels by position. The inputs stay as they are (streamed
    # inputs too: only y is replaced).
    positions = Split(train_split.x, torch.arange(n))
    labels = train_split.y
    teacher: dict[str, torch.Tensor] = {}
    if augment:
        # Each augmented batch differs from every epoch's other, so its soft targets are the ensemble's on that
        # very batch (computed as it comes) rather than on the unaugmented inputs.
        soft = None

        def forward(model: nn.Module, x: torch.Tensor, step: int) -> torch.Tensor:
            if alpha > 0:
                with torch.no_grad():
                    teacher["probs"] = ensemble.stacked_probs(x).mean(dim=0)
            return model(x)
    else:
        progress(f"[distill] soft targets: the ensemble's probabilities on the {n:,} training samples")
        soft = _ensemble_probs(ensemble, train_split.x, batch)
        forward = None

    def criterion(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        log_probs = logits.log_softmax(dim=-1)
        loss = logits.new_zeros(())
        if alpha > 0:
            target = teacher.pop("probs") if soft is None else soft[index]
            loss = loss + alpha * F.kl_div(log_probs, target, reduction="batchmean")
        if alpha < 1:
            loss = loss + (1 - alpha) * F.nll_loss(log_probs, labels[index])
        return loss

    losses: list[float] = []

    def on_epoch(epoch: int, loss: float, seconds: float) -> None:
        losses.append(loss)
        val = classification_metrics(predict_probs(student, selection.x, batch), selection.y)
        student.train()  # predicting put it in eval mode; training goes on
        epochs.step(f"[distill] epoch {epoch + 1}/{train_cfg.epochs}  loss {loss:.4f}  val acc {val['accuracy']:.4f}  "
                    f"val nll {val['nll']:.4f}  ({seconds:.1f}s)")

    with Steps(progress, train_cfg.epochs, "[distill]", "epochs") as epochs:
        torch.manual_seed(seed)  # dropout masks: the same student from the same run and options
        train(student, positions, train_cfg, seed=seed, on_epoch=on_epoch, forward=forward, augment=augment,
              criterion=criterion)
    student.eval()
    return losses


@torch.no_grad()
def _ensemble_probs(ensemble: Ensemble, x: Any, batch_size: int) -> torch.Tensor:
    """The ensemble's mean probabilities on model-form inputs ``x`` (a tensor or streamed), in batches."""
    from .tasks.classification.streaming import batch_slices, input_batches

    ensemble.eval()
    batches = input_batches(x, batch_slices(len(x), batch_size))
    return torch.cat([ensemble.stacked_probs(b).mean(dim=0) for b in batches])


def _kept(test: dict[str, dict[str, float]]) -> dict[str, float | None]:
    """The share of the ensemble's test gain over the parent the student keeps, per metric (1: all of it;
    None where the ensemble gained nothing to keep)."""
    out: dict[str, float | None] = {}
    for metric, sign in (("nll", 1.0), ("accuracy", -1.0)):
        gain = sign * (test["parent"][metric] - test["ensemble"][metric])
        out[metric] = sign * (test["parent"][metric] - test["student"][metric]) / gain if gain > 0 else None
    return out


def summary(metrics: dict[str, Any]) -> list[str]:
    """The table ``evo-subens distill`` prints: test accuracy, NLL, ECE and temperature-scaled NLL of parent,
    ensemble and student, with their parameter counts, then how much of the ensemble's gain the student keeps."""
    rows = {"parent": "parent", "ensemble": f"ensemble ({metrics['members']} members)", "student": "student"}
    lines = [f"{'':24}{'accuracy':>9}{'nll':>9}{'ece':>9}{'nll (T)':>9}{'parameters':>12}"]
    for name, label in rows.items():
        test, scaled = metrics["test"][name], metrics["temperature"][name]["test"]
        lines.append(f"{label:24}{test['accuracy']:9.4f}{test['nll']:9.4f}{test['ece']:9.4f}{scaled['nll']:9.4f}"
                     f"{metrics['parameters'][name]:12,}")
    kept, parameters = metrics["kept"], metrics["parameters"]
    # Said as a ratio, not as "cheaper": a packed run's members are narrow, so its ensemble may be the smaller.
    size = f"{parameters['student'] / parameters['ensemble']:.2f}x the ensemble's parameters"
    if kept["nll"] is None:
        lines.append(f"[distill] the ensemble's test NLL is no better than the parent's: there was no gain to keep "
                     f"(student: {size})")
    else:
        accuracy = f"{kept['accuracy']:.0%}" if kept["accuracy"] is not None else "none (the ensemble gained none)"
        lines.append(f"[distill] the student keeps {kept['nll']:.0%} of the ensemble's test NLL gain over the parent "
                     f"(of its accuracy gain: {accuracy}) in one model with {size}")
    return lines
