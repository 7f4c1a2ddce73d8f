"""Tasks: the kinds of problem the engine builds ensembles for (see :mod:`evo_subens.tasks.base`).

The registry maps a task name to where its class lives, so choosing a task imports only that task.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..core.config import RunConfig
    from .base import Progress, Task

TASKS: dict[str, str] = {"classification": "evo_subens.tasks.classification.task:ClassificationTask"}


def make_task(cfg: "RunConfig", progress: "Progress") -> "Task":
    """The task ``cfg.task`` names, for the run ``cfg``."""
    module, _, name = TASKS[cfg.task].partition(":")
    return getattr(importlib.import_module(module), name)(cfg, progress)
