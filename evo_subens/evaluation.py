"""Scoring candidates on the validation split: the code every worker runs, Ray actor or in-process.

A worker receives an :class:`EvaluationPayload` once (parent weights, validation data, family settings)
and then only genomes; it materialises each child in place on its copy of the parent, runs the
validation forward passes and restores the parent.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from .config import ChildrenConfig, ModelConfig
from .data import Split
from .families import make_family
from .models import build_model, state_copy


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


@dataclass
class EvaluationPayload:
    """Everything a worker needs, shipped once per worker (through Ray's object store)."""

    model: ModelConfig
    input_shape: tuple[int, ...]
    num_classes: int
    parent_state: dict[str, torch.Tensor]
    parent_id: str
    children: ChildrenConfig
    val_x: torch.Tensor
    val_y: torch.Tensor
    batch_size: int
    threads: int
    use_gpu: bool = False
    train_x: torch.Tensor | None = None  # only for families that train children (sparse tuning)
    train_y: torch.Tensor | None = None


def worker_device(payload: EvaluationPayload) -> str:
    """Where a worker evaluates: CUDA when GPUs were requested and this process sees one, else the CPU."""
    return "cuda" if payload.use_gpu and torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class CandidateScore:
    """Validation metrics of one candidate and the seconds its evaluation took."""

    accuracy: float
    nll: float
    seconds: float


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run a block with ``count`` intra-op threads, restoring the previous setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class CandidateEvaluator:
    """Holds the parent and the validation data on one device and scores genomes against them."""

    def __init__(self, payload: EvaluationPayload, device: str | torch.device = "cpu"):
        self.payload = payload
        self.device = torch.device(device)
        self.model = build_model(payload.model, payload.input_shape, payload.num_classes)
        self.model.load_state_dict(payload.parent_state)
        self.model.to(self.device).eval()
        self.family = make_family(payload.children)
        train_data = Split(payload.train_x, payload.train_y) if payload.train_x is not None else None
        self.materialiser = self.family.bind(self.model, train_data)
        self.val_x = payload.val_x.to(self.device)
        self.val_y = payload.val_y.to(self.device)
        # Trained children are expensive to rebuild: keep the weights of those scored here until fetched.
        self._trained: dict[str, dict[str, torch.Tensor]] = {}

    def _check_parent(self, genome: str) -> None:
        if f'"parent":"{self.payload.parent_id}"' not in genome:
            raise ValueError(f"genome was derived from another parent (expected {self.payload.parent_id}): "
                             f"{genome[:200]}")

    @torch.inference_mode()
    def score_current(self) -> tuple[float, float]:
        """Validation (accuracy, NLL) of the model as it is now (the parent, outside ``evaluate``)."""
        correct = 0
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        for begin in range(0, len(self.val_x), self.payload.batch_size):
            x = self.val_x[begin:begin + self.payload.batch_size]
            y = self.val_y[begin:begin + self.payload.batch_size]
            logits = self.model(x)
            loss += F.cross_entropy(logits.float(), y, reduction="sum").double()
            correct += int((logits.argmax(dim=1) == y).sum())
        n = len(self.val_y)
        return correct / n, loss.item() / n

    def evaluate(self, genome: str) -> CandidateScore:
        """Validation accuracy and NLL of the child ``genome``."""
        started = time.perf_counter()
        self._check_parent(genome)
        with self.materialiser.materialised(genome):
            accuracy, nll = self.score_current()
            if self.family.trains_children:
                self._trained[genome] = state_copy(self.model)
        return CandidateScore(accuracy, nll, time.perf_counter() - started)

    def child_state(self, genome: str) -> dict[str, torch.Tensor]:
        """A CPU copy of the child's full ``state_dict`` (kept from its evaluation, else rebuilt)."""
        self._check_parent(genome)
        if genome in self._trained:
            return self._trained[genome]
        with self.materialiser.materialised(genome):
            return state_copy(self.model)
