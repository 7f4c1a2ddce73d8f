"""The interface between the engine and a kind of problem.

The engine (search, families, workers, run directory, checkpoints, population log) is the same for
every problem; a :class:`Task` supplies what is not: the data, the parent and how it is trained, what a
worker scores a candidate on, how candidates are chosen for and admitted to the ensemble, and what is
measured at the end. Supervised classification is :class:`~evo_subens.tasks.classification.task.
ClassificationTask`; a new kind of problem is a new subpackage of ``tasks/`` and a registry entry in
``tasks/__init__.py``.

The order the engine calls a task in::

    task = make_task(cfg, progress)
    task.load(data)                                # data (``data``: what run() was given in memory, or None)
    task.record_data(run_dir)                      # a new run; a resumed one: task.check_data(run_dir)
    model = task.new_model()                       # the parent's architecture (seeded by the engine)
    task.train_parent(model)                       # or task.load_parent(path, model), check_loaded_parent(model)
    payload = task.worker_payload(model_state, parent_id)   # shipped once to every worker
    ... search: workers score genomes with payload.make_evaluator() ...
    check = task.holdout_check(lambda: best_state)  # per generation
    chosen, comparison = task.select(records, count, prior, states_of)
    joined = task.accept(kept_states, new_states)
    metrics = task.results(parent, member_states, member_ids)
    metrics["cost"] = task.cost(...); metrics["verdict"] = task.verdict(metrics)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:  # type hints only: importing the task interface stays cheap
    from torch import nn

    from ..core.config import RunConfig
    from ..core.search import CandidateRecord
    from ..core.state import RunResult
    from ..core.worker import WorkerPayload

Progress = Callable[[str], None]
State = dict  # a model's state_dict
StatesOf = Callable[[list["CandidateRecord"]], list[State]]


@dataclass(frozen=True)
class Metric:
    """A validation metric a task scores candidates on: logged as ``val_<name>``; ``search.fitness`` names
    the one that ranks candidates, the others break ties in the order the task declares them. A metric with
    ``ranks=False`` is a measurement only (e.g. the environment steps an evaluation took): logged, never a
    criterion."""

    name: str
    higher_is_better: bool
    label: str = ""  # its name in progress lines (default: the name)
    ranks: bool = True

    @property
    def short(self) -> str:
        return self.label or self.name


class Task(ABC):
    """A kind of problem the engine builds ensembles for. One instance serves one run, on the driver."""

    name: str
    metrics: tuple[Metric, ...]  # what an Evaluator's CandidateScore.values hold, in this order

    def __init__(self, cfg: "RunConfig", progress: Progress):
        self.cfg = cfg
        self.progress = progress

    # Data and parent ---------------------------------------------------------------------------------
    @abstractmethod
    def load(self, data: object | None = None) -> None:
        """Load (or generate) the task's data: training, validation (decisions) and test (final metrics).
        ``data``: data given in memory (``evo_subens.run(config, data=...)``) instead of the config's."""

    def record_data(self, run_dir: Path) -> None:
        """Write into a new run directory what reloading the data needs (data given in memory included) and
        what checks that it reloads unchanged; may update ``cfg`` (the engine writes the config after)."""

    def check_data(self, run_dir: Path) -> None:
        """Refuse to go on with ``run_dir`` when the data no longer loads to what it was made with."""

    @abstractmethod
    def describe_data(self) -> str:
        """One progress line on the data this run uses."""

    @abstractmethod
    def new_model(self) -> "nn.Module":
        """A freshly initialised parent architecture (the engine seeds torch before the parent's)."""

    @abstractmethod
    def load_parent(self, path: str | Path, model: "nn.Module") -> None:
        """Load a parent's weights from ``path`` into ``model``, with a clear error when they do not fit."""

    @abstractmethod
    def train_parent(self, model: "nn.Module") -> None:
        """Train the parent in place, printing progress."""

    def check_loaded_parent(self, model: "nn.Module") -> None:
        """Report how a parent loaded from the user's file scores on this run's data, warning when the
        score says it does not fit the data (e.g. it was trained on differently preprocessed inputs)."""

    def check_parent_learned(self, model: "nn.Module") -> None:
        """Refuse (a :class:`~evo_subens.errors.UserError` naming the settings to change) a parent, trained
        or loaded, that did not learn the task; the engine calls it before the search."""

    # Tuned scoring (search.scoring: tuned) -----------------------------------------------------------
    def pool_outputs(self, states: Sequence[State]) -> tuple[list, list]:
        """Outputs of each weight set on the selection data and on held-back data (None entries where
        nothing is held back), as tensors the task's :meth:`pool_loss` averages."""
        raise NotImplementedError(f"the {self.name} task has no tuned scoring")

    def pool_loss(self, outputs) -> float:
        """The loss of averaged selection outputs: what tuned scoring's ensemble minimises."""
        raise NotImplementedError(f"the {self.name} task has no tuned scoring")

    def holdout_metrics(self, outputs) -> dict[str, float]:
        """Metrics (by name) of averaged held-back outputs."""
        raise NotImplementedError(f"the {self.name} task has no tuned scoring")

    # Workers -----------------------------------------------------------------------------------------
    @abstractmethod
    def worker_payload(self, parent_state: State, parent_id: str) -> "WorkerPayload":
        """What every worker is given once: the parent, the selection data, family and tuning settings."""

    # Decisions (validation data only) ----------------------------------------------------------------
    @abstractmethod
    def holdout_check(self, weights: Callable[[], State] | None) -> dict:
        """Metrics of one candidate (``weights()`` gives its state_dict; None: it diverged) on held-back
        validation data, as ``holdout_<metric>`` keys; None values when there is nothing to check."""

    @abstractmethod
    def select(self, records: list["CandidateRecord"], count: int, prior: list["CandidateRecord"],
               states_of: StatesOf) -> tuple[list["CandidateRecord"], dict | None]:
        """``count`` new candidates for the ensemble, distinct from ``prior``, best first; and how the
        task's selection rules compared (None when there is nothing to compare)."""

    @abstractmethod
    def accept(self, kept: Sequence[State], new: Sequence[State]) -> list[int]:
        """Which of ``new`` (indices, in the order they joined) join an ensemble already holding ``kept``."""

    def prefers_parent(self, parent: State, members: Sequence[State]) -> bool:
        """Whether the parent alone should replace the accepted ensemble of ``members`` (it scores better on
        the selection data); never, by default."""
        return False

    # Results -----------------------------------------------------------------------------------------
    @abstractmethod
    def results(self, parent: "nn.Module", member_states: list[State], member_ids: list[int]) -> dict:
        """Test (and validation) metrics of parent, members and ensemble: the body of ``metrics.json``.
        The test data is touched here only, after every decision."""

    @abstractmethod
    def cost(self, *, records: Sequence["CandidateRecord"], selected: int, members: int) -> dict:
        """What the run spent (training, evaluation) on its candidates ``records``, ``selected`` of them
        chosen and ``members`` kept, for ``metrics.json``."""

    @abstractmethod
    def verdict(self, metrics: dict) -> dict:
        """The ensemble against its parent."""

    @abstractmethod
    def summary(self, metrics: dict, offered: int) -> list[str]:
        """Lines printed at the end of a run (a table, the verdict, warnings)."""

    def scored_on(self) -> str:
        """The data every candidate (and the parent's reference record) is scored on, in words with its size,
        for the lines that print those scores."""
        return "the validation data"

    def warnings(self, metrics: dict) -> list[str]:
        """Loud lines, printed last, for a run whose ensemble disappoints; none by default."""
        return []

    def diagnostics(self, rows: list[dict]) -> list[str]:
        """Extra lines on the population log's candidates (e.g. broken children); none by default."""
        return []

    def check_baseline(self) -> None:
        """Refuse, before a run directory exists, a baseline the loaded data cannot support."""
        raise NotImplementedError(f"the {self.name} task has no baselines")

    def run_baseline(self, run_dir: Path) -> "RunResult":
        """Run the config's ``method`` baseline into ``run_dir``; tasks without baselines refuse."""
        raise NotImplementedError(f"the {self.name} task has no baselines")

    def run_packed(self, run_dir: Path, parent: "nn.Module") -> "RunResult":
        """Cut, tune and choose a packed partition ensemble of ``parent`` into ``run_dir`` (method packed),
        from where the run's checkpoint says it stopped; tasks without it refuse."""
        raise NotImplementedError(f"the {self.name} task has no packed ensembles")
