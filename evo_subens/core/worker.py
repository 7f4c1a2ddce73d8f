"""The worker-side seam between the engine and a task: what a Ray actor (or this process) is given once
and what it runs for every genome.

The engine ships a :class:`WorkerPayload` to every worker once; the payload builds the task's
:class:`Evaluator`, which holds the parent and the task's validation data and scores genomes, returns a
candidate's weights and fine-tunes selected members. Nothing here knows what a candidate is scored on.
"""

from __future__ import annotations

import contextlib
import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch

if TYPE_CHECKING:
    from ..tasks.base import Metric


def parent_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """Short content hash of a parent's weights: the ``parent`` id every genome carries."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous().reshape(-1)  # 0-dim buffers cannot be viewed as bytes
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(repr(tuple(tensor.shape)).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run a block with ``count`` intra-op threads, restoring the previous setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def numerics() -> dict[str, object]:
    """What besides the config and seed decides a run's float rounding in this process: the torch build, the
    CPU vector instructions its kernels use (AVX2 and AVX-512 round differently) and its thread count. Two
    runs of one config agree bit for bit where these agree; ``metrics.json`` records them."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()}


@dataclass(frozen=True)
class CandidateScore:
    """Validation metrics of one candidate (``values``: one per metric the task declares, in its order) and
    the seconds its evaluation took; a raced-out candidate (stopped by a :class:`RacingBound`) has NaN
    metrics."""

    values: tuple[float, ...]
    seconds: float
    raced: bool = False


@dataclass(frozen=True)
class RacingBound:
    """Stops scoring a candidate once it provably cannot reach ``threshold`` on the whole validation split.

    The bound is exact, not statistical: after ``seen`` of ``total`` samples, the final accuracy is at most
    ``(correct + total - seen) / total`` and the final NLL at least ``loss_sum / total`` (every sample's
    NLL is >= 0). A candidate is stopped only when that best case is strictly worse than ``threshold``.
    """

    fitness: str  # "accuracy" or "nll"
    threshold: float

    def hopeless(self, correct: int, loss_sum: float, seen: int, total: int) -> bool:
        """Whether a candidate with these partial results cannot reach the threshold."""
        if self.fitness == "accuracy":
            return (correct + total - seen) / total < self.threshold
        return loss_sum / total > self.threshold


class Evaluator(ABC):
    """A task's worker: the parent and the validation data on one device, scoring genomes against them."""

    device: torch.device
    racing_bound: RacingBound | None = None  # set by the search before each generation

    @abstractmethod
    def evaluate_many(self, genomes: list[str]) -> list[CandidateScore]:
        """Validation scores of ``genomes``, in order."""

    @abstractmethod
    def child_state(self, genome: str) -> dict[str, torch.Tensor]:
        """A CPU copy of the child's full ``state_dict``."""

    @abstractmethod
    def finetuned_state(self, genome: str, seed: int,
                        start: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The child ``genome`` (or weights ``start``) after the task's fine-tuning, as a CPU state_dict; a
        function of (genome, seed, start), whichever worker runs it."""


class WorkerPayload(ABC):
    """Everything a worker needs, shipped once per worker (through Ray's object store)."""

    parent_id: str
    metrics: tuple["Metric", ...]  # the task's validation metrics: what the evaluator's scores hold, in order
    threads: int            # torch threads of the worker
    use_gpu: bool           # evaluate on CUDA when the worker sees a GPU
    stack_candidates: int   # genomes handed to one ``evaluate_many`` call

    @abstractmethod
    def make_evaluator(self, device: str | torch.device = "cpu") -> Evaluator:
        """The task's evaluator for this payload, on ``device``."""

    def device(self) -> str:
        """Where a worker evaluates: CUDA when GPUs were requested and this process sees one, else the CPU."""
        return "cuda" if self.use_gpu and torch.cuda.is_available() else "cpu"

