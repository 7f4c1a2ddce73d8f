"""Tasks: the kinds of problem the engine builds ensembles for (see :mod:`evo_subens.tasks.base`).

The registry maps a task name to where its class lives, so choosing a task imports only that task.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..core.config import RunConfig
    from .base import Metric, Progress, Task

TASKS: dict[str, str] = {"classification": "evo_subens.tasks.classification.task:ClassificationTask",
                         "rl": "evo_subens.tasks.rl.task:RLTask"}
# Where each task declares its validation metrics (its Task.metrics): a light module, so that checking a
# config's search.fitness does not import the task's engine parts.
TASK_METRICS: dict[str, str] = {"classification": "evo_subens.tasks.classification.metrics:VALIDATION_METRICS",
                                "rl": "evo_subens.tasks.rl.metrics:VALIDATION_METRICS"}

# The config sections only one task reads (model, children, search, ... serve both): a run of the other task
# records them at their defaults, which say nothing about it.
TASK_SECTIONS: dict[str, tuple[str, ...]] = {"classification": ("data", "parent"), "rl": ("env", "ppo", "policy")}


def unused_sections(task: str, method: str) -> set[str]:
    """The config sections a run of ``task`` with ``method`` does not read: the other tasks' own,
    ``baseline`` but for a baseline method, ``packed`` but for the packed method."""
    unused = {section for name, sections in TASK_SECTIONS.items() if name != task for section in sections}
    return (unused | ({"baseline"} if method in ("subnetworks", "packed") else set())
            | ({"packed"} if method != "packed" else set()))


def _load(spec: str):
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def task_class(name: str) -> type["Task"]:
    """The class of the registered task ``name``."""
    return _load(TASKS[name])


def task_metrics(name: str) -> tuple["Metric", ...]:
    """The validation metrics of the registered task ``name`` (the same as its class's ``metrics``)."""
    return _load(TASK_METRICS[name])


def make_task(cfg: "RunConfig", progress: "Progress") -> "Task":
    """The task ``cfg.task`` names, for the run ``cfg``."""
    return task_class(cfg.task)(cfg, progress)
